# Helpers shared by every pipeline: config lookup, shard wildcards, device resources, targets.
# Pipeline-specific input functions live in the library (mlprep/<pipeline>/workflow.py), where they are unit-tested.
RESULTS = "results"
TARGETS = []


wildcard_constraints:
    shard=r"\d+-of-\d+",


def pipeline_enabled(name):
    return bool(lookup(dpath=f"{name}/enabled", within=config, default=False))


def gpus_for_device(wildcards):
    """1 GPU for model rules unless the config pins them to the CPU."""
    return 0 if str(config["device"]) == "cpu" else 1
