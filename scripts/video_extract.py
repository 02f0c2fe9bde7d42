"""Snakemake entry: sample, decode and resize the frames of one shard of clips (rule video_extract_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.video.extract import extract_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
extract_shard(
    shard=f"{sm.wildcards.split}/{sm.wildcards.shard}",
    list_path=sm.params.shard_list,
    cfg=sm.config["video_frames"],
    continue_on_error=sm.config["continue_on_error"],
    threads=sm.threads,
    outputs=dict(sm.output.items()),
    storage=sm.config.get("object_storage"),
    progress=progress,
)
