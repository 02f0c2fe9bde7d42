# The whole-workflow overview that `snakemake --report results/report.html` shows first: every enabled pipeline's
# metrics, eval plot, items per rule, failures with reasons, and the throughput of each rule (benchmark files).
from mlprep.config import PIPELINES

REPORT_PIPELINES = [name for name in PIPELINES if pipeline_enabled(name)]
PIPELINE_TARGETS = list(TARGETS)

if REPORT_PIPELINES:
    TARGETS.append(f"{RESULTS}/report/overview.html")


localrules:
    workflow_overview,


rule workflow_overview:
    input:
        PIPELINE_TARGETS,
    output:
        html=report(
            f"{RESULTS}/report/overview.html",
            caption="../report/overview.rst",
            category="overview",
        ),
        throughput=report(
            f"{RESULTS}/report/throughput.png",
            caption="../report/throughput.rst",
            category="overview",
        ),
    log:
        f"{RESULTS}/logs/report/overview.log",
    params:
        pipelines=REPORT_PIPELINES,
        results=RESULTS,
    script:
        "../scripts/workflow_overview.py"
