"""Snakemake entry: fail the run when too many utterances failed (rule speaker_check)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.speaker import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.check(
    summary_path=sm.input.summary,
    failures_path=sm.input.failures,
    max_failed_fraction=sm.params.max_failed_fraction,
    out=sm.output[0],
)
