"""Snakemake entry: top-k SKU accuracy of held-out augmented queries (rule sku_evaluate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku import steps  # noqa: E402

sm = snakemake  # noqa: F821
log_to_file(sm.log[0])
steps.evaluate_index(
    index_path=sm.input.index,
    embeddings_path=sm.input.embeddings,
    metadata_path=sm.input.metadata,
    info_path=sm.input.info,
    query_path=sm.input.query_embeddings,
    query_meta_path=sm.input.query_metadata,
    ks=sm.params.top_k,
    outputs=dict(sm.output.items()),
    rerank=sm.params.rerank,
    query_photos_path=sm.input.query_photos[0] if sm.input.query_photos else None,
    max_queries=sm.params.max_queries,
    seed=sm.config["seed"],
)
