"""Merging shards into one FAISS index, and ranking SKUs from vector hits (the index itself: mlprep.indexing)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from mlprep.io import load_npy

log = logging.getLogger(__name__)

def merge_shards(embedding_paths: Sequence[Path | str], metadata_paths: Sequence[Path | str]):
    """Concatenate shard outputs in a canonical order (item id, view): the result does not depend on
    how items were spread over shards."""
    vectors, frames = [], []
    for emb_path, meta_path in zip(embedding_paths, metadata_paths, strict=True):
        emb = load_npy(emb_path)
        meta = pd.read_parquet(meta_path)
        if len(emb) != len(meta):
            raise ValueError(f"{emb_path} has {len(emb)} vectors but {meta_path} has {len(meta)} rows")
        vectors.append(emb)
        frames.append(meta)
    meta = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    dims = {v.shape[1] for v in vectors if len(v)}
    if len(dims) > 1:
        raise ValueError(f"shards disagree on the embedding size: {sorted(dims)}")
    dim = dims.pop() if dims else (vectors[0].shape[1] if vectors else 0)
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), dtype=np.float32)
    if len(meta):
        order = np.lexsort((meta["view"].to_numpy(), meta["item_id"].to_numpy(dtype=str)))
        meta = meta.iloc[order].reset_index(drop=True)
        stacked = stacked[order]
    return np.ascontiguousarray(stacked, dtype=np.float32), meta


def rank_skus(
    index: faiss.Index, sku_of_vector: np.ndarray, queries: np.ndarray, k: int, fetch: int = 64,
    item_of_vector: np.ndarray | None = None, exclude: list | None = None,
) -> list[list[tuple[str, float]]]:
    """Top-k SKUs per query, a SKU scored by its best vector (several views of a SKU count once). `exclude`: per
    query, an item whose vectors do not count (`item_of_vector` says each vector's item): a query made from a
    catalog photo is searched with that photo left out."""
    results: list[list[tuple[str, float]]] = []
    if index.ntotal == 0:
        return [[] for _ in range(len(queries))]
    fetch = min(max(fetch, k), index.ntotal)
    scores, ids = index.search(queries, fetch)
    for row, query in enumerate(queries):
        row_scores, row_ids = scores[row], ids[row]
        left_out = exclude[row] if exclude is not None else None
        while True:
            ranked: dict[str, float] = {}
            for score, vid in zip(row_scores, row_ids):
                if vid < 0 or (left_out is not None and item_of_vector[vid] == left_out):
                    continue
                if sku_of_vector[vid] not in ranked:
                    ranked[str(sku_of_vector[vid])] = float(score)
            if len(ranked) >= k or len(row_ids) >= index.ntotal:
                break
            more = min(len(row_ids) * 4, index.ntotal)  # too few distinct SKUs: look deeper
            row_scores, row_ids = (a[0] for a in index.search(query[None, :], more))
        results.append(list(ranked.items())[:k])
    return results
