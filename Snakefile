import sys

from snakemake.utils import min_version

min_version("9.0")

# The library lives beside the workflow; make it importable at parse time whatever the working dir.
sys.path.insert(0, workflow.basedir)
from mlprep.config import ConfigError, check_config


configfile: "config/config.yaml"


report: "report/workflow.rst"


# Schema (with defaults) and the input paths it names, before any job: only a short message naming the key.
try:
    check_config(config, f"{workflow.basedir}/config/schema.yaml")
except ConfigError as err:
    sys.exit(str(err))


include: "rules/common.smk"
include: "rules/sku_index.smk"
include: "rules/video_frames.smk"
include: "rules/speaker_embed.smk"
include: "rules/kline_factor.smk"
include: "rules/probe_qa.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        TARGETS,
