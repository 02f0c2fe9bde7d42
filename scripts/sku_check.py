"""Snakemake entry: fail the run when too many items failed or duplicates are refused (rule sku_check)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.check(
    info_path=sm.input.info,
    failures_path=sm.input.failures,
    checks_path=sm.input.checks,
    max_failed_fraction=sm.params.max_failed_fraction,
    duplicate_policy=sm.params.duplicate_images,
    out=sm.output[0],
)
