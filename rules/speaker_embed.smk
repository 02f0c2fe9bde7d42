# speaker_embed: speech corpus -> utterance embeddings -> one embedding per speaker (seed 004).
from mlprep.speaker.workflow import SpeakerWorkflow

SPEAKER = config["speaker_embed"]
SPEAKER_FLOW = SpeakerWorkflow(config, RESULTS, main_process=workflow.is_main_process)
SPEAKER_DIR = SPEAKER_FLOW.dir

PIPELINE_OUTPUTS["speaker_embed"] = [
    f"{SPEAKER_DIR}/speakers.parquet",
    f"{SPEAKER_DIR}/check.json",
    f"{SPEAKER_DIR}/eval.json",
]


localrules:
    speaker_manifest,
    speaker_gather,
    speaker_check,


rule speaker_manifest:
    input:
        [SPEAKER["manifest"]] if SPEAKER["manifest"] else [],
    output:
        manifest=f"{SPEAKER_DIR}/manifest.parquet",
        failures=f"{SPEAKER_DIR}/manifest_failures.parquet",
    log:
        f"{RESULTS}/logs/speaker_embed/manifest.log",
    conda:
        "../envs/speaker_embed.yaml"
    params:
        shards=SPEAKER_FLOW.shard_count_param,
        catalog=SPEAKER_FLOW.catalog_fingerprint,
        lists=SPEAKER_FLOW.lists_dir,
    script:
        "../scripts/speaker_manifest.py"


rule speaker_embed_shard:
    output:
        directory(f"{SPEAKER_DIR}/shards/{{shard}}"),
    log:
        f"{RESULTS}/logs/speaker_embed/embed_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speaker_embed/embed_{{shard}}.tsv"
    conda:
        "../envs/speaker_embed.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=MODEL_GPUS,
    params:
        shard_list=SPEAKER_FLOW.shard_list_pattern,
        fingerprint=SPEAKER_FLOW.shard_fingerprint,
        settings=SPEAKER_FLOW.embed_settings(),
    script:
        "../scripts/speaker_embed.py"


rule speaker_gather:
    input:
        shards=SPEAKER_FLOW.shard_dirs,
        manifest_failures=f"{SPEAKER_DIR}/manifest_failures.parquet",
    output:
        speakers=f"{SPEAKER_DIR}/speakers.parquet",
        speaker_embeddings=f"{SPEAKER_DIR}/speaker_embeddings.npy",
        speaker_ids=f"{SPEAKER_DIR}/speaker_ids.txt",
        utterance_embeddings=f"{SPEAKER_DIR}/utterance_embeddings.npy",
        utterances=f"{SPEAKER_DIR}/utterances.parquet",
        skipped=f"{SPEAKER_DIR}/skipped_speakers.parquet",
        failures=f"{SPEAKER_DIR}/failures.parquet",
        pickles=directory(f"{SPEAKER_DIR}/speakers_pkl"),
        summary=f"{SPEAKER_DIR}/summary.json",
    log:
        f"{RESULTS}/logs/speaker_embed/gather.log",
    conda:
        "../envs/speaker_embed.yaml"
    params:
        write_pickles=SPEAKER["write_pickles"],
    script:
        "../scripts/speaker_gather.py"


rule speaker_check:
    input:
        summary=f"{SPEAKER_DIR}/summary.json",
        failures=f"{SPEAKER_DIR}/failures.parquet",
    output:
        f"{SPEAKER_DIR}/check.json",
    log:
        f"{RESULTS}/logs/speaker_embed/check.log",
    conda:
        "../envs/speaker_embed.yaml"
    params:
        max_failed_fraction=config["max_failed_fraction"],
    script:
        "../scripts/speaker_check.py"


rule speaker_evaluate:
    input:
        utterances=f"{SPEAKER_DIR}/utterances.parquet",
        utterance_embeddings=f"{SPEAKER_DIR}/utterance_embeddings.npy",
        speakers=f"{SPEAKER_DIR}/speakers.parquet",
        speaker_embeddings=f"{SPEAKER_DIR}/speaker_embeddings.npy",
        check=f"{SPEAKER_DIR}/check.json",
    output:
        eval=f"{SPEAKER_DIR}/eval.json",
        plot=report(
            f"{SPEAKER_DIR}/eval.png",
            caption="../report/speaker_eval.rst",
            category="speaker_embed",
        ),
    log:
        f"{RESULTS}/logs/speaker_embed/evaluate.log",
    conda:
        "../envs/speaker_embed.yaml"
    params:
        per_speaker=SPEAKER["eval"]["holdout_per_speaker"],
        p_target=SPEAKER["eval"]["p_target"],
        threshold=SPEAKER["eval"]["threshold"],
    script:
        "../scripts/speaker_evaluate.py"
