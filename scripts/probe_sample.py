"""Snakemake entry: sample the failure cases per failure key and cut the QA shards' lists (rule probe_sample)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe.samples import sample  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
sample(
    cases_path=sm.input.cases,
    cfg=with_storage(sm.config),
    seed=sm.config["seed"],
    continue_on_error=sm.config["continue_on_error"],
    outputs=dict(sm.output.items()),
)
