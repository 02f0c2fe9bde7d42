"""Retrieval evaluation: held-out augmented queries against the augmented and the originals-only index."""

from __future__ import annotations

import faiss
import matplotlib
import numpy as np
import pandas as pd

from mlprep.sku.index import rank_skus

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def topk_accuracy(
    index: faiss.Index, index_skus: np.ndarray, queries: np.ndarray, query_skus: np.ndarray, ks: list[int]
) -> dict[str, float | None]:
    """top-k SKU accuracy for each k (None when there are no queries)."""
    if not len(queries):
        return {f"top{k}": None for k in ks}
    ranked = rank_skus(index, index_skus, queries, max(ks), fetch=max(ks) * 32)
    return {
        f"top{k}": float(np.mean([truth in [s for s, _ in r[:k]] for truth, r in zip(query_skus, ranked)]))
        for k in ks
    }


def exact_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    if len(vectors):
        index.add(vectors)
    return index


def evaluate(
    index: faiss.Index,
    index_vectors: np.ndarray,
    index_meta: pd.DataFrame,
    queries: np.ndarray,
    query_meta: pd.DataFrame,
    ks: list[int],
) -> dict:
    """Accuracies of the built index, of its exact equivalent, and of an exact originals-only index."""
    skus = index_meta["sku_id"].to_numpy(dtype=object)
    query_skus = query_meta["sku_id"].to_numpy(dtype=object)
    originals = (index_meta["view"] == 0).to_numpy()
    result = {
        "n_queries": int(len(queries)),
        "n_skus": int(index_meta["sku_id"].nunique()),
        "n_vectors": int(index.ntotal),
        "n_original_vectors": int(originals.sum()),
        "augmented_index": topk_accuracy(index, skus, queries, query_skus, ks),
        "augmented_exact": topk_accuracy(exact_index(index_vectors), skus, queries, query_skus, ks),
        "originals_only_exact": topk_accuracy(
            exact_index(index_vectors[originals]), skus[originals], queries, query_skus, ks
        ),
    }
    return result


def plot_accuracy(result: dict, path) -> None:
    """Grouped bars: top-k accuracy per index variant."""
    variants = ["augmented_index", "augmented_exact", "originals_only_exact"]
    ks = list(result["augmented_index"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [result[variant][k] or 0.0 for k in ks]
        bars = ax.bar(np.arange(len(ks)) + i * width, values, width, label=variant.replace("_", " "))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(ks)) + width * (len(variants) - 1) / 2, ks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("SKU accuracy")
    ax.set_title(f"{result['n_queries']} held-out augmented queries, {result['n_skus']} SKUs")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
