"""Catalog checks after encoding: the same image under different SKUs, and the most confusable SKU pairs.

These are warnings about the catalog, not failures of items: a photo listed under two SKUs makes
both SKUs equally right answers for it, and two SKUs whose product photos embed nearly alike will
be confused by any search. `duplicate_images` decides what happens to exact duplicates.
"""

from __future__ import annotations

import html
import logging

import numpy as np
import pandas as pd

from mlprep.rng import rng_for

log = logging.getLogger(__name__)

CHECK_COLUMNS = ["check", "sku_a", "item_a", "image_a", "sku_b", "item_b", "image_b", "score", "action"]
DUPLICATE_CHECKS = ("same_file", "same_bytes")
POLICY_ACTION = {"keep": "kept", "drop": "dropped", "fail": "failed"}


def _frame(rows: pd.DataFrame | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(columns=CHECK_COLUMNS) if rows is None else rows[CHECK_COLUMNS]
    return frame.astype({c: "string" for c in CHECK_COLUMNS if c != "score"} | {"score": "float64"})


def duplicate_images(originals: pd.DataFrame, policy: str) -> pd.DataFrame:
    """One row per image whose bytes equal an image of another SKU listed earlier in sku_data.json.

    `originals`: item_id, sku_id, image, content_hash, listed (one row per image). The earliest
    listed image of each group is the one kept; `action` says what happens to the later one.
    """
    groups = originals[originals["content_hash"].duplicated(keep=False)].sort_values(["content_hash", "listed"])
    if not len(groups):
        return _frame()
    first = groups.groupby("content_hash", sort=False).transform("first")
    later = groups["item_id"] != first["item_id"]
    other_sku = groups["sku_id"] != first["sku_id"]
    a, b = first[later & other_sku], groups[later & other_sku]
    rows = pd.DataFrame({
        "check": np.where(a["image"].to_numpy() == b["image"].to_numpy(), "same_file", "same_bytes"),
        "sku_a": a["sku_id"].to_numpy(), "item_a": a["item_id"].to_numpy(), "image_a": a["image"].to_numpy(),
        "sku_b": b["sku_id"].to_numpy(), "item_b": b["item_id"].to_numpy(), "image_b": b["image"].to_numpy(),
        "score": 1.0,
        "action": POLICY_ACTION[policy],
    })
    return _frame(rows)


def confusable_pairs(vectors: np.ndarray, originals: pd.DataFrame, top: int, sample: int, seed: int,
                     threads: int = 1) -> pd.DataFrame:
    """The `top` pairs of different SKUs whose original images are most alike (inner product of
    L2-normalised embeddings), each SKU pair once with its closest two images. Exact pairs of the
    same bytes are left to duplicate_images. Every image is searched when there are at most `sample`
    of them; beyond that a seeded sample of `sample` images is searched against all of them."""
    n = len(vectors)
    if top <= 0 or n < 2:
        return _frame()
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    queries = np.arange(n) if n <= sample else np.sort(rng_for(seed, "confusable-sample").choice(n, sample, False))
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, hits = index.search(vectors[queries], min(n, 16))
    q = np.repeat(queries, hits.shape[1])
    h, s = hits.ravel(), scores.ravel()
    skus = originals["sku_id"].to_numpy(dtype=object)
    hashes = originals["content_hash"].to_numpy(dtype=object)
    keep = (h >= 0) & (h != q)
    q, h, s = q[keep], h[keep], s[keep]
    keep = (skus[q] != skus[h]) & (hashes[q] != hashes[h])
    q, h, s = q[keep], h[keep], s[keep]
    if not len(q):
        return _frame()
    swap = skus[q].astype(str) > skus[h].astype(str)  # each pair once, its SKUs in sorted order
    a, b = np.where(swap, h, q), np.where(swap, q, h)
    pairs = pd.DataFrame({"a": a, "b": b, "score": s, "key_a": skus[a], "key_b": skus[b]})
    best = pairs.sort_values(["score", "key_a", "key_b"], ascending=[False, True, True], kind="stable")
    best = best.drop_duplicates(["key_a", "key_b"]).head(top)
    ia, ib = best["a"].to_numpy(), best["b"].to_numpy()
    rows = pd.DataFrame({
        "check": "confusable",
        "sku_a": skus[ia], "item_a": originals["item_id"].to_numpy(dtype=object)[ia],
        "image_a": originals["image"].to_numpy(dtype=object)[ia],
        "sku_b": skus[ib], "item_b": originals["item_id"].to_numpy(dtype=object)[ib],
        "image_b": originals["image"].to_numpy(dtype=object)[ib],
        "score": best["score"].to_numpy(dtype=np.float64).round(6),
        "action": "",
    })
    return _frame(rows)


def checks_html(checks: pd.DataFrame, exhaustive: bool, sample: int, max_rows: int = 200) -> str:
    """A small self-contained page of the checks (at most `max_rows` per table), for the Snakemake report."""
    dups = checks[checks["check"].isin(DUPLICATE_CHECKS)]
    conf = checks[checks["check"] == "confusable"]
    scope = "every original image" if exhaustive else f"a seeded sample of {sample} original images"

    def table(frame: pd.DataFrame) -> str:
        if not len(frame):
            return "<p>none</p>"
        cols = ["check", "sku_a", "image_a", "sku_b", "image_b", "score", "action"]
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in row) + "</tr>"
            for row in frame[cols].head(max_rows).itertuples(index=False)
        )
        more = f"<p>first {max_rows} of {len(frame)}; all in catalog_checks.parquet</p>" if len(frame) > max_rows else ""
        return f"<table><tr>{head}</tr>{body}</table>{more}"

    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>sku_index catalog checks</title>"
        "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>"
        f"<h2>Same image under different SKUs ({len(dups)})</h2>{table(dups)}"
        f"<h2>Most confusable SKU pairs ({len(conf)}, searched over {scope})</h2>{table(conf)}"
        "</body></html>\n"
    )
