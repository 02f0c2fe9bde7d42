# video_frames: video-text pairs -> num_frames uniformly spaced frames per clip, CLIP4MC pkl shards (seed 003).
from mlprep.video.workflow import VideoWorkflow

VIDEO = config["video_frames"]
VIDEO_FLOW = VideoWorkflow(config, RESULTS, main_process=workflow.is_main_process)
VIDEO_DIR = VIDEO_FLOW.dir

PIPELINE_OUTPUTS["video_frames"] = [
    f"{VIDEO_DIR}/summary.json",
    f"{VIDEO_DIR}/contact_sheet.png",
    f"{VIDEO_DIR}/check.json",
]


localrules:
    video_manifest,
    video_gather,
    video_check,


rule video_manifest:
    input:
        pairs=[VIDEO["pairs"]] if VIDEO["pairs"] else [],
    output:
        manifest=f"{VIDEO_DIR}/manifest.parquet",
        failures=f"{VIDEO_DIR}/manifest_failures.parquet",
    log:
        f"{RESULTS}/logs/video_frames/manifest.log",
    conda:
        "../envs/video_frames.yaml"
    params:
        shard_counts=VIDEO_FLOW.shard_counts_param,
        lists=VIDEO_FLOW.lists_dir,
        catalog=VIDEO_FLOW.catalog_fingerprint,
    script:
        "../scripts/video_manifest.py"


rule video_extract_shard:
    output:
        **VIDEO_FLOW.webdataset_output,
        pkl=f"{VIDEO_DIR}/{{split}}/{{shard}}.pkl",
        index=f"{VIDEO_DIR}/{{split}}/{{shard}}.index.parquet",
    log:
        f"{RESULTS}/logs/video_frames/extract_{{split}}_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/video_frames/extract_{{split}}_{{shard}}.tsv"
    wildcard_constraints:
        split="train|val",
    conda:
        "../envs/video_frames.yaml"
    threads: 1
    resources:
        # a decode lane per thread, each ~0.3 GB at its peak on 1080p clips (mlprep.video.extract.DecodeLanes)
        mem_mb=lambda wildcards, threads: 4000 + 400 * (threads - 1),
    params:
        shard_list=VIDEO_FLOW.shard_list_pattern,
        fingerprint=VIDEO_FLOW.shard_fingerprint,
        settings=VIDEO_FLOW.frame_settings(),
    script:
        "../scripts/video_extract.py"


rule video_gather:
    input:
        manifest_failures=f"{VIDEO_DIR}/manifest_failures.parquet",
        pkl=VIDEO_FLOW.shard_files(".pkl"),
        index=VIDEO_FLOW.shard_files(".index.parquet"),
        tars=VIDEO_FLOW.tar_files,
    output:
        summary=f"{VIDEO_DIR}/summary.json",
        index=f"{VIDEO_DIR}/index.parquet",
        failures=f"{VIDEO_DIR}/failures.parquet",
        sheet=report(
            f"{VIDEO_DIR}/contact_sheet.png",
            caption="../report/video_contact_sheet.rst",
            category="video_frames",
        ),
    log:
        f"{RESULTS}/logs/video_frames/gather.log",
    conda:
        "../envs/video_frames.yaml"
    params:
        shards=VIDEO_FLOW.shard_prefixes,
        sheet_clips=VIDEO["contact_sheet_clips"],
    script:
        "../scripts/video_gather.py"


rule video_check:
    input:
        summary=f"{VIDEO_DIR}/summary.json",
        failures=f"{VIDEO_DIR}/failures.parquet",
    output:
        f"{VIDEO_DIR}/check.json",
    log:
        f"{RESULTS}/logs/video_frames/check.log",
    conda:
        "../envs/video_frames.yaml"
    params:
        max_failed_fraction=config["max_failed_fraction"],
    script:
        "../scripts/video_check.py"
