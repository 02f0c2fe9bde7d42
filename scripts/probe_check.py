"""Snakemake entry: fail the run when too many images could not be probed (rule probe_check)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.check(sm.input.stats, sm.input.failures, sm.params.max_failed_fraction, sm.output[0])
