"""Real query photos in the eval (`sku_index.eval.queries`): a folder of photos as users take them and a truth
table that names each photo's SKU, searched through the path `search-sku` and the service take (mlprep.sku.search:
decode, embed, rank, re-rank), by embeddings alone and re-ranked.

The truth table is a CSV, TSV, parquet or JSON (a list of objects) file with the columns `image` (the photo's path
inside the folder) and `sku_id`. A photo that cannot be read is one failure row (with its reason code) and counts
as a miss in the accuracies; a row whose SKU the catalog does not have stays in the table (`in_catalog` false) and
out of the accuracies, which are over the queries a perfect search could answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TRUTH_COLUMNS = ("image", "sku_id")


class TruthTableError(ValueError):
    """A truth table that cannot be used; the message names the file and what is wrong."""


def read_truth(path: Path | str) -> pd.DataFrame:
    """The truth table's `image` and `sku_id` columns, as strings, in its order."""
    path = Path(path)
    suffix = path.suffix.lower()
    readers = {".csv": pd.read_csv, ".tsv": lambda p, **kw: pd.read_csv(p, sep="\t", **kw),
               ".parquet": pd.read_parquet, ".json": pd.read_json}
    if suffix not in readers:
        raise TruthTableError(f"{path}: sku_index.eval.queries.truth must be a .csv, .tsv, .parquet or .json file")
    try:
        frame = readers[suffix](path, dtype=str) if suffix in (".csv", ".tsv") else readers[suffix](path)
    except FileNotFoundError as err:
        raise TruthTableError(f"{path}: sku_index.eval.queries.truth: no such file") from err
    except Exception as err:  # a reader's own parse error, whichever library raised it
        raise TruthTableError(f"{path}: cannot be read as a truth table: {type(err).__name__}: {err}") from err
    missing = [c for c in TRUTH_COLUMNS if c not in frame.columns]
    if missing:
        raise TruthTableError(f"{path}: no column {', '.join(map(repr, missing))} (a truth table has the columns "
                              f"'image' and 'sku_id'; it has {', '.join(map(repr, map(str, frame.columns)))})")
    frame = frame[list(TRUTH_COLUMNS)]
    blank = frame.isna().any(axis=1) | (frame.astype(str).apply(lambda c: c.str.strip()) == "").any(axis=1)
    if blank.any():
        raise TruthTableError(f"{path}: row {int(np.flatnonzero(blank.to_numpy())[0]) + 1} has an empty image or "
                              f"sku_id")
    if not len(frame):
        raise TruthTableError(f"{path}: the truth table has no rows")
    return frame.astype(str).reset_index(drop=True)


def search_query_photos(index_path: Path | str, images_dir: Path | str, truth_path: Path | str, k: int,
                        device: str | None, threads: int, out: Path | str) -> pd.DataFrame:
    """Search every photo of the truth table in the built index, by embeddings alone and re-ranked, and write one
    `sku.query_photos` row per photo: its SKU, whether the catalog has it, the top-k SKUs of each ranking, and the
    failure's reason code where the photo cannot be used."""
    from mlprep.io import write_parquet
    from mlprep.sku.search import SkuSearcher

    truth = read_truth(truth_path)
    searcher = SkuSearcher(index_path, device=device, threads=threads, rerank=True)
    paths = [str(Path(images_dir) / image) for image in truth["image"]]
    vectors, ok, failed, datas = searcher._embed(paths)
    by_embedding = searcher.rank(vectors, k) if len(ok) else []
    reranked = searcher.rank_images([datas[p] for p in ok], vectors, k) if len(ok) else []
    rows = truth.assign(in_catalog=truth["sku_id"].isin(set(searcher.skus)), status="ok", reason_code="", error="",
                        embedding_top=[[] for _ in paths], reranked_top=[[] for _ in paths], inliers=0,
                        ranked_by="")
    for position, plain, verified in zip(ok, by_embedding, reranked):
        rows.at[position, "embedding_top"] = [sku for sku, _ in plain]
        rows.at[position, "reranked_top"] = [r.sku_id for r in verified]
        rows.at[position, "inliers"] = verified[0].inliers if verified else 0
        rows.at[position, "ranked_by"] = verified[0].ranked_by if verified else ""
    embedded = set(ok)  # the failures are the other positions, in order (a photo listed twice fails twice)
    for position, failure in zip([p for p in range(len(paths)) if p not in embedded], failed, strict=True):
        rows.loc[position, ["status", "reason_code", "error"]] = ["failed", failure.reason_code, failure.error]
    write_parquet(rows, out, "sku.query_photos")
    return rows


def query_photo_accuracy(rows: pd.DataFrame, ks: list[int], reranked: bool) -> dict:
    """eval.json's `query_photos`: top-k SKU accuracy of the photos whose SKU the catalog has (a photo that could
    not be read is a miss), by embeddings alone and, where the index was re-ranked, re-ranked."""
    usable = rows[rows["in_catalog"]]
    result = {"n_queries": int(len(usable)), "n_failed": int((usable["status"] != "ok").sum()),
              "n_not_in_catalog": int((~rows["in_catalog"]).sum())}

    def accuracy(column: str) -> dict:
        if not len(usable):
            return {f"top{k}": None for k in ks}
        return {f"top{k}": float(np.mean([t in list(top)[:k] for t, top in zip(usable["sku_id"], usable[column])]))
                for k in ks}

    result["embedding"] = accuracy("embedding_top")
    if reranked:
        result["reranked"] = accuracy("reranked_top")
        result["verified_first"] = float((usable["ranked_by"] == "geometry").mean()) if len(usable) else None
    return result
