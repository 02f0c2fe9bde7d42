"""Snakemake entry: read and validate video-text pairs, assign splits and shards (rule video_manifest)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.video import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.manifest(
    cfg=sm.config["video_frames"],
    seed=sm.config["seed"],
    shard_counts=sm.params.shard_counts,
    lists_folder=sm.params.lists,
    continue_on_error=sm.config["continue_on_error"],
    outputs=dict(sm.output.items()),
    storage=sm.config.get("object_storage"),
)
