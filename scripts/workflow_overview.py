"""Snakemake entry: the whole-workflow overview page and throughput chart (rule workflow_overview)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.report import write_overview  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
results = Path(sm.output.html).parent.parent  # results/report/overview.html
write_overview(results, list(sm.params.pipelines), sm.output.html, sm.output.throughput)
