# kline_factor: price files -> pattern library -> FAISS index -> win-rate factor -> IC evaluation (seed 001).
from mlprep.kline.workflow import KlineWorkflow

KLINE = config["kline_factor"]
KLINE_FLOW = KlineWorkflow(config, RESULTS, main_process=workflow.is_main_process)
KLINE_DIR = KLINE_FLOW.dir

PIPELINE_OUTPUTS["kline_factor"] = [f"{KLINE_DIR}/factor.parquet", f"{KLINE_DIR}/check.json", f"{KLINE_DIR}/eval.json"]


localrules:
    kline_manifest,
    kline_check,


rule kline_manifest:
    output:
        manifest=f"{KLINE_DIR}/manifest.parquet",
        failures=f"{KLINE_DIR}/manifest_failures.parquet",
    log:
        f"{RESULTS}/logs/kline_factor/manifest.log",
    conda:
        "../envs/kline_factor.yaml"
    params:
        shards=KLINE_FLOW.shard_count_param,
        catalog=KLINE_FLOW.catalog_fingerprint,
    script:
        "../scripts/kline_manifest.py"


rule kline_library_shard:
    output:
        directory(f"{KLINE_DIR}/shards/{{shard}}"),
    log:
        f"{RESULTS}/logs/kline_factor/library_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/kline_factor/library_{{shard}}.tsv"
    conda:
        "../envs/kline_factor.yaml"
    threads: 2 if KLINE["embedding"] == "chart" else 1
    resources:
        mem_mb=4000 if KLINE["embedding"] == "chart" else 2000,
        gpu=MODEL_GPUS if KLINE["embedding"] == "chart" else 0,
    params:
        shard_list=KLINE_FLOW.shard_list_pattern,
        fingerprint=KLINE_FLOW.shard_fingerprint,
        settings=KLINE_FLOW.library_settings(),
    script:
        "../scripts/kline_library.py"


rule kline_gather:
    input:
        shards=KLINE_FLOW.shard_dirs,
        manifest_failures=f"{KLINE_DIR}/manifest_failures.parquet",
    output:
        library=f"{KLINE_DIR}/library.parquet",
        embeddings=f"{KLINE_DIR}/library_embeddings.npy",
        closes=f"{KLINE_DIR}/library_closes.npy",
        index=f"{KLINE_DIR}/index.faiss",
        failures=f"{KLINE_DIR}/failures.parquet",
        summary=f"{KLINE_DIR}/summary.json",
        series_checks=f"{KLINE_DIR}/series_checks.parquet",
    log:
        f"{RESULTS}/logs/kline_factor/gather.log",
    benchmark:
        f"{RESULTS}/benchmarks/kline_factor/gather.tsv"
    conda:
        "../envs/kline_factor.yaml"
    threads: 2
    params:
        index=KLINE["index"],
    script:
        "../scripts/kline_gather.py"


rule kline_check:
    input:
        summary=f"{KLINE_DIR}/summary.json",
        failures=f"{KLINE_DIR}/failures.parquet",
    output:
        f"{KLINE_DIR}/check.json",
    log:
        f"{RESULTS}/logs/kline_factor/check.log",
    conda:
        "../envs/kline_factor.yaml"
    params:
        max_failed_fraction=config["max_failed_fraction"],
    script:
        "../scripts/kline_check.py"


rule kline_win_rate:
    input:
        windows=f"{KLINE_DIR}/library.parquet",
        embeddings=f"{KLINE_DIR}/library_embeddings.npy",
        closes=f"{KLINE_DIR}/library_closes.npy",
        index=f"{KLINE_DIR}/index.faiss",
        series_checks=f"{KLINE_DIR}/series_checks.parquet",
        check=f"{KLINE_DIR}/check.json",
        sample_file=[KLINE["factor"]["sample_file"]] if KLINE["factor"]["sample_file"] else [],
    output:
        factor=f"{KLINE_DIR}/factor.parquet",
        stats=f"{KLINE_DIR}/factor_stats.json",
        failures=f"{KLINE_DIR}/factor_failures.parquet",
    log:
        f"{RESULTS}/logs/kline_factor/factor.log",
    benchmark:
        f"{RESULTS}/benchmarks/kline_factor/factor.tsv"
    conda:
        "../envs/kline_factor.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        factor=KLINE["factor"],
    script:
        "../scripts/kline_factor.py"


rule kline_evaluate:
    input:
        factor=f"{KLINE_DIR}/factor.parquet",
        library=f"{KLINE_DIR}/library.parquet",
    output:
        eval=f"{KLINE_DIR}/eval.json",
        plot=report(
            f"{KLINE_DIR}/eval.png",
            caption="../report/kline_eval.rst",
            category="kline_factor",
        ),
    log:
        f"{RESULTS}/logs/kline_factor/evaluate.log",
    conda:
        "../envs/kline_factor.yaml"
    params:
        eval=KLINE["eval"],
    script:
        "../scripts/kline_evaluate.py"
