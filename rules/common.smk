# Helpers shared by every pipeline: config lookup, shard wildcards, device resources, targets.
# Pipeline-specific input functions live in the library (mlprep/<pipeline>/workflow.py), where they are unit-tested.
RESULTS = "results"
TARGETS = []
PIPELINE_OUTPUTS = {}  # pipeline -> its final outputs (each rules file adds its own)


wildcard_constraints:
    shard=r"\d+-of-\d+",


def pipeline_enabled(name):
    return bool(lookup(dpath=f"{name}/enabled", within=config, default=False))


# GPUs a model job asks for: 1 unless the config pins models to the CPU. A constant, not a function of the
# job: with ten thousand shards, every per-job callable costs Snakemake a signature inspection per job.
MODEL_GPUS = 0 if str(config["device"]) == "cpu" else 1
