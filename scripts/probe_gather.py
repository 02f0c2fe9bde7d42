"""Snakemake entry: merge the probe and factor shards (rule probe_gather)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.gather(
    probe_dirs=list(sm.input.probes),
    factor_dirs=list(sm.input.factors),
    manifest_failures=sm.input.manifest_failures,
    outputs=dict(sm.output.items()),
)
