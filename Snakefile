from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/sku_index.smk"
include: "rules/video_frames.smk"


rule all:
    default_target: True
    input:
        TARGETS,
