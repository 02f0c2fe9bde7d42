"""FAISS indexes shared by the pipelines that search (sku_index, kline_factor): any index-factory string,
trained on a seeded sample when it needs training, with recall@k against the exact search to say what an
approximate index costs."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from mlprep.io import atomic_path
from mlprep.rng import rng_for

log = logging.getLogger(__name__)

EXACT_FACTORIES = {"Flat", "IDMap,Flat"}


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
