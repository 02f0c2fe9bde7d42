"""Snakemake entry: merge encode shards into the FAISS index and metadata (rule sku_build_index)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.build(
    shard_dirs=list(sm.input.shards),
    manifest_path=sm.input.manifest,
    manifest_failures_path=sm.input.manifest_failures,
    cfg=sm.config["sku_index"],
    seed=sm.config["seed"],
    device_spec=sm.config["device"],
    precision_spec=sm.config["precision"],
    threads=sm.threads,
    outputs=dict(sm.output.items()),
)
