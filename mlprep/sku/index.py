"""Merging shards into one FAISS index, and ranking SKUs from vector hits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from mlprep.io import atomic_path, load_npy
from mlprep.rng import rng_for

log = logging.getLogger(__name__)

EXACT_FACTORIES = {"Flat", "IDMap,Flat"}


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


def build_index(vectors: np.ndarray, factory: str, seed: int, train_sample: int) -> faiss.Index:
    """An inner-product index from any FAISS factory string, trained on a seeded sample when it needs training."""
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"FAISS cannot build index factory {factory!r}: {err}") from err
    if not index.is_trained:
        n = min(len(vectors), train_sample)
        sample = vectors[np.sort(rng_for(seed, "faiss-train").choice(len(vectors), n, replace=False))] if n else vectors
        log.info("training %s on %d of %d vectors", factory, n, len(vectors))
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(
                f"FAISS could not train {factory!r} on {n} vectors ({err}); "
                "use a smaller index (fewer lists/centroids) or the exact Flat index for small data"
            ) from err
    if len(vectors):
        index.add(vectors)
    return index


def apply_search_params(index: faiss.Index, search_params: str | None) -> None:
    """Apply a FAISS ParameterSpace string such as 'nprobe=16' or 'efSearch=64'."""
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)


def write_index(index: faiss.Index, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: Path | str) -> faiss.Index:
    if not Path(path).is_file():
        raise FileNotFoundError(f"FAISS index {path} does not exist")
    return faiss.read_index(str(path))


def recall_at_k(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float | None:
    """Share of the exact top-k neighbours that `index` also returns, over `queries`."""
    if not len(queries) or not len(vectors):
        return None
    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found))
    return hits / (k * len(queries))


def rank_skus(
    index: faiss.Index, sku_of_vector: np.ndarray, queries: np.ndarray, k: int, fetch: int = 64
) -> list[list[tuple[str, float]]]:
    """Top-k SKUs per query, a SKU scored by its best vector (several views of a SKU count once)."""
    results: list[list[tuple[str, float]]] = []
    if index.ntotal == 0:
        return [[] for _ in range(len(queries))]
    fetch = min(max(fetch, k), index.ntotal)
    scores, ids = index.search(queries, fetch)
    for row, query in enumerate(queries):
        row_scores, row_ids = scores[row], ids[row]
        while True:
            ranked: dict[str, float] = {}
            for score, vid in zip(row_scores, row_ids):
                if vid >= 0 and sku_of_vector[vid] not in ranked:
                    ranked[str(sku_of_vector[vid])] = float(score)
            if len(ranked) >= k or len(row_ids) >= index.ntotal:
                break
            more = min(len(row_ids) * 4, index.ntotal)  # too few distinct SKUs: look deeper
            row_scores, row_ids = (a[0] for a in index.search(query[None, :], more))
        results.append(list(ranked.items())[:k])
    return results
