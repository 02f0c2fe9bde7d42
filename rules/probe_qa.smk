# probe_qa: parquet image datasets -> probe -> failure factors (LLM) -> failure-key sample -> QA pairs (LLM) (seed 002).
from mlprep.probe.workflow import ProbeWorkflow

PROBE = config["probe_qa"]
PROBE_FLOW = ProbeWorkflow(config, RESULTS, main_process=workflow.is_main_process)
PROBE_DIR = PROBE_FLOW.dir
# The probe runs a local model with classifier and clip_zero_shot; the openai backend and the LLM steps wait on the
# network.
PROBE_GPUS = MODEL_GPUS if PROBE["probe"]["backend"] in ("classifier", "clip_zero_shot") else 0

PIPELINE_OUTPUTS["probe_qa"] = [f"{PROBE_DIR}/qa.jsonl", f"{PROBE_DIR}/summary.json", f"{PROBE_DIR}/check.json"]


localrules:
    probe_manifest,
    probe_check,


rule probe_manifest:
    output:
        manifest=f"{PROBE_DIR}/manifest.parquet",
        failures=f"{PROBE_DIR}/manifest_failures.parquet",
    log:
        f"{RESULTS}/logs/probe_qa/manifest.log",
    conda:
        "../envs/probe_qa.yaml"
    params:
        shards=PROBE_FLOW.shard_count_param,
        catalog=PROBE_FLOW.catalog_fingerprint,
        lists=PROBE_FLOW.lists_dir,
    script:
        "../scripts/probe_manifest.py"


rule probe_shard:
    output:
        directory(f"{PROBE_DIR}/shards/{{shard}}"),
    log:
        f"{RESULTS}/logs/probe_qa/probe_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_qa/probe_{{shard}}.tsv"
    conda:
        "../envs/probe_qa.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=PROBE_GPUS,
    params:
        shard_list=PROBE_FLOW.shard_list_pattern,
        labels=PROBE_FLOW.labels_path,
        fingerprint=PROBE_FLOW.shard_fingerprint,
        settings=PROBE_FLOW.probe_settings(),
        cache=f"{PROBE_DIR}/llm_cache/probe_{{shard}}.sqlite",
    script:
        "../scripts/probe_shard.py"


rule probe_factors:
    input:
        f"{PROBE_DIR}/shards/{{shard}}",
    output:
        directory(f"{PROBE_DIR}/factors/{{shard}}"),
    log:
        f"{RESULTS}/logs/probe_qa/factors_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_qa/factors_{{shard}}.tsv"
    conda:
        "../envs/probe_qa.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=PROBE_FLOW.factor_settings(),
        cache=f"{PROBE_DIR}/llm_cache/factors_{{shard}}.sqlite",
    script:
        "../scripts/probe_factors.py"


rule probe_gather:
    input:
        probes=PROBE_FLOW.probe_dirs,
        factors=PROBE_FLOW.factor_dirs,
        manifest_failures=f"{PROBE_DIR}/manifest_failures.parquet",
    output:
        probe=f"{PROBE_DIR}/probe.parquet",
        cases=f"{PROBE_DIR}/failure_cases.parquet",
        failures=f"{PROBE_DIR}/failures.parquet",
        stats=f"{PROBE_DIR}/probe_stats.json",
    log:
        f"{RESULTS}/logs/probe_qa/gather.log",
    conda:
        "../envs/probe_qa.yaml"
    script:
        "../scripts/probe_gather.py"


rule probe_check:
    input:
        stats=f"{PROBE_DIR}/probe_stats.json",
        failures=f"{PROBE_DIR}/failures.parquet",
    output:
        f"{PROBE_DIR}/check.json",
    log:
        f"{RESULTS}/logs/probe_qa/check.log",
    conda:
        "../envs/probe_qa.yaml"
    params:
        max_failed_fraction=config["max_failed_fraction"],
    script:
        "../scripts/probe_check.py"


rule probe_sample:
    input:
        cases=f"{PROBE_DIR}/failure_cases.parquet",
        check=f"{PROBE_DIR}/check.json",
    output:
        samples=f"{PROBE_DIR}/samples.jsonl",
        qa_lists=directory(f"{PROBE_DIR}/qa_lists"),
        stats=f"{PROBE_DIR}/sample_stats.json",
        failures=f"{PROBE_DIR}/sample_failures.parquet",
    log:
        f"{RESULTS}/logs/probe_qa/sample.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_qa/sample.tsv"
    conda:
        "../envs/probe_qa.yaml"
    params:
        sampler=PROBE["sampler"],
        qa_shards=PROBE["qa"]["shards"],
    script:
        "../scripts/probe_sample.py"


rule probe_qa_shard:
    input:
        lists=f"{PROBE_DIR}/qa_lists",
    output:
        directory(f"{PROBE_DIR}/qa/{{shard}}"),
    log:
        f"{RESULTS}/logs/probe_qa/qa_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/probe_qa/qa_{{shard}}.tsv"
    conda:
        "../envs/probe_qa.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=PROBE_FLOW.qa_settings(),
        cache=f"{PROBE_DIR}/llm_cache/qa_{{shard}}.sqlite",
    script:
        "../scripts/probe_qa.py"


rule probe_summary:
    input:
        probe=f"{PROBE_DIR}/probe.parquet",
        cases=f"{PROBE_DIR}/failure_cases.parquet",
        stats=f"{PROBE_DIR}/probe_stats.json",
        sample_stats=f"{PROBE_DIR}/sample_stats.json",
        qa=PROBE_FLOW.qa_dirs,
    output:
        qa=f"{PROBE_DIR}/qa.jsonl",
        qa_failures=f"{PROBE_DIR}/qa_failures.jsonl",
        summary=f"{PROBE_DIR}/summary.json",
        plot=report(
            f"{PROBE_DIR}/summary.png",
            caption="../report/probe_summary.rst",
            category="probe_qa",
        ),
    log:
        f"{RESULTS}/logs/probe_qa/summary.log",
    conda:
        "../envs/probe_qa.yaml"
    params:
        top_confusions=20,
    script:
        "../scripts/probe_summary.py"
