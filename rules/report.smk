# The whole-workflow overview that `snakemake --report results/report.html` shows first: every enabled pipeline's
# metrics, eval plot, items per rule, failures with reasons, and the throughput of each rule (benchmark files).
from mlprep.config import PIPELINES

REPORT_PIPELINES = [name for name in PIPELINES if pipeline_enabled(name)]
PIPELINE_TARGETS = [path for name in REPORT_PIPELINES for path in PIPELINE_OUTPUTS[name]]
TARGETS.extend(PIPELINE_TARGETS)

if REPORT_PIPELINES:
    TARGETS.append(f"{RESULTS}/report/overview.html")


# One target rule per pipeline, named after it: `snakemake --cores all sku_index` builds that pipeline alone.
for pipeline_name, pipeline_outputs in PIPELINE_OUTPUTS.items():

    rule:
        name:
            pipeline_name
        input:
            pipeline_outputs,
        localrule: True


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
    conda:
        "../envs/report.yaml"
    params:
        pipelines=REPORT_PIPELINES,
    script:
        "../scripts/workflow_overview.py"
