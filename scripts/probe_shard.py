"""Snakemake entry: probe the images of one shard's row groups (rule probe_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe.probe import probe_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
probe_shard(
    shard_text=sm.wildcards.shard,
    list_path=sm.params.shard_list,
    labels_path=sm.params.labels,
    cfg=with_storage(sm.config),
    continue_on_error=sm.config["continue_on_error"],
    out_dir=sm.output[0],
    cache_path=sm.params.cache,
    progress=progress,
    seed=sm.config["seed"],
    device_spec=sm.config["device"],
    precision_spec=sm.config["precision"],
    jpeg_decoder=sm.config["jpeg_decoder"],
    threads=sm.threads,
)
