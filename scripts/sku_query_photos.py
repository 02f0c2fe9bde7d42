"""Snakemake entry: search the users' own query photos in the built index (rule sku_query_photos)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku.queries import search_query_photos  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
search_query_photos(
    index_path=sm.input.index,
    images_dir=sm.params.images_dir,
    truth_path=sm.input.truth,
    k=sm.params.k,
    device=sm.config["device"],
    threads=sm.threads,
    out=sm.output[0],
)
