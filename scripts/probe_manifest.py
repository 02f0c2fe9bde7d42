"""Snakemake entry: list the parquet row groups with their shards (rule probe_manifest)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.manifest(
    cfg=with_storage(sm.config),
    n_shards=sm.params.shards,
    continue_on_error=sm.config["continue_on_error"],
    outputs=dict(sm.output.items()),
    lists_dir=sm.params.lists,
)
