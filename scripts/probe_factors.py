"""Snakemake entry: complete and verify the failure factor of one probe shard's failures (rule probe_factors)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe.factors import factor_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
factor_shard(
    shard_text=sm.wildcards.shard,
    probe_dir=sm.input[0],
    cfg=with_storage(sm.config),
    continue_on_error=sm.config["continue_on_error"],
    out_dir=sm.output[0],
    cache_path=sm.params.cache,
    progress=progress,
)
