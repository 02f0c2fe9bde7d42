"""Snakemake entry: merge the QA shards and summarise every step (rule probe_summary)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.probe.catalog import with_storage  # noqa: E402
from mlprep.probe import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.summary(
    probe_path=sm.input.probe,
    cases_path=sm.input.cases,
    probe_stats=sm.input.stats,
    sample_stats=sm.input.sample_stats,
    qa_dirs=list(sm.input.qa),
    top=sm.params.top_confusions,
    dataset=steps.dataset_info(with_storage(sm.config)),
    outputs=dict(sm.output.items()),
)
