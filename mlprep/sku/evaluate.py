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
    """Accuracies of the built index, of its exact equivalent (the same figures, not searched again, where the
    built index is itself exact), and of an exact originals-only index."""
    skus = index_meta["sku_id"].to_numpy(dtype=object)
    query_skus = query_meta["sku_id"].to_numpy(dtype=object)
    originals = (index_meta["view"] == 0).to_numpy()
    built = topk_accuracy(index, skus, queries, query_skus, ks)
    exact = isinstance(index, faiss.IndexFlat) and index.ntotal == len(index_vectors)
    result = {
        "n_queries": int(len(queries)),
        "n_skus": int(index_meta["sku_id"].nunique()),
        "n_vectors": int(index.ntotal),
        "n_original_vectors": int(originals.sum()),
        "augmented_index": built,
        "augmented_exact": built if exact else topk_accuracy(exact_index(index_vectors), skus, queries, query_skus,
                                                             ks),
        "originals_only_exact": topk_accuracy(
            exact_index(index_vectors[originals]), skus[originals], queries, query_skus, ks
        ),
    }
    return result


def sample_queries(query_meta: pd.DataFrame, limit: int | None, seed: int) -> np.ndarray:
    """Row numbers of at most `limit` held-out queries (None: all), in their order: those whose seeded draw, by
    item and view, is smallest, so the same queries whatever the shard split. Each query is searched against
    every vector two or three times over: past a few thousand the figures gain little and the cost grows as catalog
    size squared."""
    if limit is None or len(query_meta) <= limit:
        return np.arange(len(query_meta))
    from mlprep.rng import derive_seed

    draws = np.fromiter((derive_seed(seed, "sku-eval-sample", item, view) for item, view in
                         zip(query_meta["item_id"], query_meta["view"])), dtype=np.uint64, count=len(query_meta))
    return np.sort(np.argsort(draws, kind="stable")[:limit])


SHOP_FLOOR_PROTOCOL = ("each query is made from one catalog photo (mlprep.sku.shopfloor: perspective, a sticker, "
                       "light, blur, lower resolution, JPEG) and searched with that photo left out of the index, so "
                       "it must be found through another photo of its SKU; SKUs with one photo are left out")


def shop_floor(vectors: np.ndarray, meta: pd.DataFrame, queries: np.ndarray, query_table, photos, ks: list[int],
               settings) -> dict:
    """Top-k SKU accuracy of the shop-floor queries, by embeddings alone and re-ranked by geometry (`settings`: a
    mlprep.sku.geometry.Geometry, or None), each query's own photo left out of the index and of the re-ranking."""
    from mlprep.sku.geometry import rerank

    rows = query_table.rows
    photos_per_sku = meta[meta["view"] == 0].groupby("sku_id")["item_id"].nunique() if len(meta) else pd.Series()
    usable = (rows["sku_id"].map(photos_per_sku).fillna(0).to_numpy() >= 2) if len(rows) else np.zeros(0, bool)
    result = {"protocol": SHOP_FLOOR_PROTOCOL, "n_queries": int(usable.sum()),
              "n_left_out_single_photo": int((~usable).sum())}
    k_max = max(ks + [settings.top_k if settings is not None else 0])
    if not usable.any():
        result["embedding"] = {f"top{k}": None for k in ks}
        return result
    positions = np.flatnonzero(usable)
    own = rows["item_id"].to_numpy(dtype=object)[positions]
    truth = rows["sku_id"].to_numpy(dtype=object)[positions]
    ranked = rank_skus(exact_index(vectors), meta["sku_id"].to_numpy(dtype=object), queries[positions], k_max,
                       fetch=k_max * 32, item_of_vector=meta["item_id"].to_numpy(dtype=object), exclude=list(own))

    def accuracy(lists) -> dict:
        return {f"top{k}": float(np.mean([t in [r[0] for r in row[:k]] for t, row in zip(truth, lists)])) for k in ks}

    result["embedding"] = accuracy(ranked)
    if settings is None or not len(photos):
        return result
    by_sku: dict[str, list[tuple[str, int]]] = {}
    for row, (item, sku) in enumerate(zip(photos.rows["item_id"], photos.rows["sku_id"])):
        by_sku.setdefault(sku, []).append((item, row))
    reranked, verified = [], 0
    for position, left_out, candidates in zip(positions, own, ranked):
        query = query_table.features(position)
        out = rerank(candidates, query, lambda sku: [photos.features(r) for i, r in by_sku.get(sku, [])
                                                     if i != left_out], settings)
        verified += out[0][3] >= settings.min_inliers
        reranked.append(out)
    result["reranked"] = accuracy(reranked)
    result["verified_first"] = float(verified / len(positions))
    return result


def plot_accuracy(result: dict, path) -> None:
    """Grouped bars: top-k accuracy per query family and index variant, the shop-floor queries first."""
    families = {}
    photos = result.get("query_photos") or {}
    if photos.get("n_queries"):
        families["query photos, embedding"] = photos["embedding"]
        if "reranked" in photos:
            families["query photos, re-ranked"] = photos["reranked"]
    floor = result.get("shop_floor") or {}
    if floor.get("n_queries"):
        families["shop floor, embedding"] = floor["embedding"]
        if "reranked" in floor:
            families["shop floor, re-ranked"] = floor["reranked"]
    families.update({f"augmented, {v.replace('_', ' ')}": result[v]
                     for v in ["augmented_index", "augmented_exact", "originals_only_exact"]})
    variants = list(families)
    ks = list(result["augmented_index"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [families[variant][k] or 0.0 for k in ks]
        bars = ax.bar(np.arange(len(ks)) + i * width, values, width, label=variant)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(ks)) + width * (len(variants) - 1) / 2, ks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("SKU accuracy")
    real = f"{photos['n_queries']} real, " if photos.get("n_queries") else ""
    ax.set_title(f"{real}{floor.get('n_queries', 0)} shop-floor and {result['n_queries']} augmented queries, "
                 f"{result['n_skus']} SKUs", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
