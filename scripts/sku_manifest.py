"""Snakemake entry: list and validate SKU images into the manifest (rule sku_manifest)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku import steps  # noqa: E402

log_to_file(snakemake.log[0])  # noqa: F821
steps.manifest(
    sku_data=snakemake.input.sku_data,  # noqa: F821
    source=snakemake.params.source,  # noqa: F821
    n_shards=snakemake.params.shards,  # noqa: F821
    lists_folder=snakemake.params.lists,  # noqa: F821
    continue_on_error=snakemake.params.continue_on_error,  # noqa: F821
    out_items=snakemake.output.manifest,  # noqa: F821
    out_failures=snakemake.output.failures,  # noqa: F821
)
