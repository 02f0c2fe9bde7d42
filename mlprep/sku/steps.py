"""The sku_index pipeline's cheap steps (manifest, index, checks, evaluation); scripts/ only unpack `snakemake`
and call these.

Heavy modules (faiss, matplotlib) are imported inside the steps that use them, so the manifest and
check jobs start in a fraction of a second; torch and open_clip are only ever imported by the
encode step (mlprep.sku.encode).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import FailureLog, check_failed_share, count_by_code, read_failures, write_failures
from mlprep.io import atomic_dir, atomic_path, load_npy, read_json, save_npy, write_json, write_parquet
from mlprep.sku.catalog import Source, load_catalog

log = logging.getLogger(__name__)


class DuplicateImagesError(RuntimeError):
    """duplicate_images: fail, and the catalog lists the same image under different SKUs."""


def manifest(sku_data, source: dict, n_shards: int, lists_folder, continue_on_error: bool, out_items,
             out_failures) -> None:
    catalog = load_catalog(sku_data, Source(**source), n_shards, lists_folder)
    failures = FailureLog(continue_on_error)
    failures.extend(catalog.failures)
    frame = catalog.items_frame()
    write_parquet(frame, out_items, "sku.manifest")
    write_failures(failures.records, out_failures)
    log.info("%d image items from %s, %d failures, %d shards", len(frame), sku_data, len(failures), n_shards)


def _originals(meta: pd.DataFrame, listed: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Row numbers of the original views (view 0) and their items with their sku_data.json position."""
    rows = np.flatnonzero((meta["view"] == 0).to_numpy())
    items = meta.iloc[rows][["item_id", "sku_id", "image", "content_hash"]].reset_index(drop=True)
    return rows, items.merge(listed, on="item_id", how="left")


def catalog_checks(vectors: np.ndarray, meta: pd.DataFrame, listed: pd.DataFrame, cfg: dict, seed: int,
                   threads: int) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(vectors, meta) after the duplicate_images policy, and the checks table."""
    from mlprep.sku.checks import confusable_pairs, duplicate_images

    policy = cfg["duplicate_images"]
    rows, originals = _originals(meta, listed)
    duplicates = duplicate_images(originals, policy)
    if len(duplicates):
        log.warning("%d images repeat an image of another SKU (duplicate_images: %s); see catalog_checks.parquet",
                    len(duplicates), policy)
    if policy == "drop" and len(duplicates):
        keep = ~meta["item_id"].isin(duplicates["item_b"]).to_numpy()
        vectors, meta = np.ascontiguousarray(vectors[keep]), meta[keep].reset_index(drop=True)
        rows, originals = _originals(meta, listed)
    confusable = confusable_pairs(vectors[rows], originals, cfg["confusable_pairs"], cfg["confusable_sample"], seed,
                                  threads)
    checks = pd.concat([duplicates, confusable], ignore_index=True) if len(duplicates) else confusable
    return vectors, meta, checks


def build(shard_dirs: list, manifest_path, manifest_failures_path, cfg: dict, seed: int, device_spec: str,
          precision_spec: str, threads: int, outputs: dict) -> dict:
    """Merge the shard folders into the index, its metadata (with names and categories from the manifest),
    the held-out queries, the failures table and the catalog checks."""
    import faiss

    from mlprep.sku.checks import DUPLICATE_CHECKS, checks_html
    from mlprep.sku.encode import SHARD_FILES
    from mlprep.indexing import EXACT_FACTORIES, apply_search_params, build_index, recall_at_k, write_index
    from mlprep.sku.index import merge_shards

    faiss.omp_set_num_threads(max(1, threads))
    shard_dirs = [Path(d) for d in shard_dirs]
    identity = shard_model(shard_dirs)
    vectors, meta = merge_shards([d / SHARD_FILES["embeddings"] for d in shard_dirs],
                                 [d / SHARD_FILES["metadata"] for d in shard_dirs])
    queries, query_meta = merge_shards([d / SHARD_FILES["query_embeddings"] for d in shard_dirs],
                                       [d / SHARD_FILES["query_metadata"] for d in shard_dirs])
    manifest = pd.read_parquet(manifest_path, columns=["item_id", "name", "category", "listed"])
    meta, query_meta = _with_names(meta, manifest), _with_names(query_meta, manifest)
    n_before = int(meta["item_id"].nunique()) if len(meta) else 0
    vectors, meta, checks = catalog_checks(vectors, meta, manifest[["item_id", "listed"]], cfg, seed, threads)
    index_cfg = cfg["index"]
    index = build_index(vectors, index_cfg["factory"], seed, index_cfg["train_sample"])
    apply_search_params(index, index_cfg.get("search_params"))
    exact = index_cfg["factory"] in EXACT_FACTORIES
    failures = read_failures([manifest_failures_path, *(d / SHARD_FILES["failures"] for d in shard_dirs)])
    n_items = int(meta["item_id"].nunique()) if len(meta) else 0
    n_originals = int((meta["view"] == 0).sum()) if len(meta) else 0
    info = {
        "factory": index_cfg["factory"],
        "metric": "inner_product",
        "search_params": index_cfg.get("search_params"),
        "ntotal": int(index.ntotal),
        "dim": int(vectors.shape[1]),
        "n_skus": int(meta["sku_id"].nunique()) if len(meta) else 0,
        "n_items_ok": n_items,
        "n_dropped_duplicates": n_before - n_items,
        "augment_per_image": cfg["augment_per_image"],
        "rerank": cfg["rerank"],  # how queries are re-ranked against local_features*
        "query_crops": list(cfg["query_crops"]),  # what a query's embedding averages (mlprep.sku.search)
        "model": cfg["model"],
        "model_identity": identity,
        "seed": seed,  # also seeds random model weights: the search command rebuilds the same model
        "device": device_spec,
        "precision": precision_spec,
        "exact": exact,
        "recall_at_10": None if exact else recall_at_k(index, vectors, queries[: index_cfg["recall_sample"]], 10),
        "n_failures": int(len(failures)),
        "failures_by_code": count_by_code(failures),
        "catalog_checks": {
            "duplicate_images": int(checks["check"].isin(DUPLICATE_CHECKS).sum()),
            "confusable_pairs": int((checks["check"] == "confusable").sum()),
            "confusable_search": "exhaustive" if n_originals <= cfg["confusable_sample"] else "sampled",
        },
    }
    write_index(index, outputs["index"])
    save_npy(vectors, outputs["embeddings"])
    write_embedding_parts(vectors, meta, outputs["embedding_parts"])
    write_parquet(meta, outputs["metadata"], "sku.views")
    save_npy(queries, outputs["query_embeddings"])
    write_parquet(query_meta, outputs["query_metadata"], "sku.views")
    write_parquet(failures, outputs["failures"], "failures")
    write_parquet(checks, outputs["checks"], "sku.catalog_checks")
    _gather_features(shard_dirs, meta, outputs)
    with atomic_path(outputs["checks_html"]) as tmp:
        tmp.write_text(checks_html(checks, n_originals <= cfg["confusable_sample"], cfg["confusable_sample"]))
    write_json(info, outputs["info"])
    log.info("index: %s", info)
    return info


def _gather_features(shard_dirs: list[Path], meta: pd.DataFrame, outputs: dict) -> None:
    """The shards' local features of catalog photos and their shop-floor queries, beside the index: only photos the
    index kept (a dropped duplicate's go too), in item order (the same whatever the shard split)."""
    from mlprep.sku.encode import LOCAL_FEATURES, SHOP_FLOOR, SHOP_FLOOR_EMBEDDINGS
    from mlprep.sku.geometry import FeatureTable

    kept = set(meta["item_id"]) if len(meta) else set()
    folder = Path(outputs["local_features"]).parent
    photos = [FeatureTable.read(d, LOCAL_FEATURES, "sku.local_features") for d in shard_dirs
              if FeatureTable.paths(d, LOCAL_FEATURES)[0].exists()]
    photos = FeatureTable.concat(photos, "sku.local_features")
    if len(photos):
        keep = photos.rows["item_id"].isin(kept).to_numpy()
        order = np.flatnonzero(keep)[np.argsort(photos.rows["item_id"].to_numpy(dtype=str)[keep], kind="stable")]
        photos = photos.select(order)
    photos.write(folder, LOCAL_FEATURES)
    parts = [(FeatureTable.read(d, SHOP_FLOOR, "sku.shop_floor"), load_npy(d / SHOP_FLOOR_EMBEDDINGS))
             for d in shard_dirs if (d / SHOP_FLOOR_EMBEDDINGS).exists()]
    queries = FeatureTable.concat([t for t, _ in parts], "sku.shop_floor")
    dim = next((v.shape[1] for _, v in parts if v.ndim == 2), 0)
    vectors = np.concatenate([v for _, v in parts]) if parts else np.zeros((0, dim), np.float32)
    if len(queries):
        keep = queries.rows["item_id"].isin(kept).to_numpy()
        rows = queries.rows[keep]
        order = np.flatnonzero(keep)[np.lexsort((rows["query"].to_numpy(), rows["item_id"].to_numpy(dtype=str)))]
        queries, vectors = queries.select(order), vectors[order]
    queries.write(folder, SHOP_FLOOR)
    save_npy(np.ascontiguousarray(vectors, dtype=np.float32), outputs["shop_floor_embeddings"])


METADATA_COLUMNS = ["item_id", "sku_id", "name", "category", "image", "view", "augmentation", "content_hash"]


class MixedModelsError(ValueError):
    """Shards made by different models (or weights) cannot share one index."""


def shard_model(shard_dirs: list[Path]) -> dict | None:
    """The one model identity (family, name, weights, checkpoint SHA-256) every shard's stats record; shards made
    by different models are refused, naming them."""
    from mlprep.sku.encode import SHARD_FILES

    identities: dict[str, list[str]] = {}
    found = None
    for folder in shard_dirs:
        model = read_json(folder / SHARD_FILES["stats"]).get("model")
        identities.setdefault(json.dumps(model, sort_keys=True), []).append(folder.name)
        found = model
    if len(identities) > 1:
        described = "; ".join(f"{', '.join(names)}: {key}" for key, names in identities.items())
        raise MixedModelsError(f"sku_index: the shards were made by different models and cannot share one index "
                               f"({described}); rerun the shards with one model")
    return found


ROWS_PER_PART = 100_000  # an img_emb part of at most 100,000 vectors: 512 MB at 1280 dimensions


def write_embedding_parts(vectors: np.ndarray, meta: pd.DataFrame, folder, rows_per_part: int = ROWS_PER_PART) -> int:
    """The index's vectors and their rows in the layout autofaiss and clip-retrieval read and write:
    `img_emb/img_emb_<k>.npy` (float32, L2-normalised) and `metadata/metadata_<k>.parquet` (row i of one is row
    i of the other; `image_path` is the image as sku_data.json names it, `caption` its SKU's name), so that
    `autofaiss build_index --embeddings=<folder>/img_emb` or clip-retrieval's back end take them as they are.
    Returns the number of parts; written whole or not at all."""
    parts = max(1, -(-len(vectors) // rows_per_part))
    width = max(5, len(str(parts - 1)))  # zero-padded: readers pair the files in name order
    rows = pd.DataFrame({"image_path": meta["image"], "caption": meta["name"], "sku_id": meta["sku_id"],
                         "item_id": meta["item_id"], "view": meta["view"], "category": meta["category"]})
    with atomic_dir(folder) as tmp:
        (tmp / "img_emb").mkdir()
        (tmp / "metadata").mkdir()
        for k in range(parts):
            part = slice(k * rows_per_part, (k + 1) * rows_per_part)
            np.save(tmp / "img_emb" / f"img_emb_{k:0{width}d}.npy", np.ascontiguousarray(vectors[part],
                                                                                         dtype=np.float32))
            write_parquet(rows.iloc[part], tmp / "metadata" / f"metadata_{k:0{width}d}.parquet",
                          "sku.embedding_metadata")
    return parts


def _with_names(meta: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The shard metadata with each SKU's name and category from the manifest, in the index's column order."""
    if not len(meta):
        return pd.DataFrame({c: pd.Series(dtype="int32" if c == "view" else "string") for c in METADATA_COLUMNS})
    names = manifest.drop_duplicates("item_id").set_index("item_id")
    joined = meta.assign(name=meta["item_id"].map(names["name"]).fillna(""),
                         category=meta["item_id"].map(names["category"]).fillna(""))
    return joined[METADATA_COLUMNS].astype({c: "string" for c in METADATA_COLUMNS if c != "view"})


def check(info_path, failures_path, checks_path, max_failed_fraction: float, duplicate_policy: str, out) -> dict:
    """Fail the run when too many items failed, or on duplicate images under duplicate_images: fail."""
    info = read_json(info_path)
    result = check_failed_share("sku_index", info["n_items_ok"], pd.read_parquet(failures_path),
                                max_failed_fraction, failures_path)
    if duplicate_policy == "fail":
        from mlprep.sku.checks import DUPLICATE_CHECKS

        checks = pd.read_parquet(checks_path)
        dups = checks[checks["check"].isin(DUPLICATE_CHECKS)]
        if len(dups):
            shown = "; ".join(f"{r.image_b} of SKU {r.sku_b!r} = {r.image_a} of SKU {r.sku_a!r}"
                              for r in dups.head(5).itertuples())
            raise DuplicateImagesError(
                f"sku_index: {len(dups)} images repeat an image of another SKU (duplicate_images: fail): {shown}"
                f"{' ...' if len(dups) > 5 else ''}; all are listed in {checks_path}"
            )
    write_json(result, out)
    log.info("check passed: %s", result)
    return result


def evaluate_index(index_path, embeddings_path, metadata_path, info_path, query_path, query_meta_path,
                   ks, outputs: dict, rerank: dict | None = None, query_photos_path=None,
                   max_queries: int | None = None, seed: int = 0) -> dict:
    """eval.json: the users' own query photos first where the config names them (`eval.queries`), then the
    shop-floor queries (what users' photos get: by embeddings alone and re-ranked by
    geometry), then the held-out augmented views (the index's own augmentation family: an upper bound)."""
    from mlprep.indexing import apply_search_params, read_index
    from mlprep.sku.encode import LOCAL_FEATURES, SHOP_FLOOR, SHOP_FLOOR_EMBEDDINGS
    from mlprep.sku.evaluate import evaluate, plot_accuracy, sample_queries, shop_floor
    from mlprep.sku.geometry import FeatureTable, Geometry

    index = read_index(index_path)
    info = read_json(info_path)
    apply_search_params(index, info.get("search_params"))
    vectors = load_npy(embeddings_path)
    meta = pd.read_parquet(metadata_path)
    queries, query_meta = load_npy(query_path), pd.read_parquet(query_meta_path)
    indexed = query_meta["item_id"].isin(meta["item_id"]).to_numpy() if len(query_meta) else np.zeros(0, bool)
    queries, query_meta = queries[indexed], query_meta[indexed].reset_index(drop=True)  # drops dropped duplicates
    held_out = len(query_meta)
    rows = sample_queries(query_meta, max_queries, seed)  # eval.max_queries
    queries, query_meta = queries[rows], query_meta.iloc[rows].reset_index(drop=True)
    folder = Path(index_path).parent
    settings = Geometry.from_config(rerank)
    floor = shop_floor(vectors, meta, load_npy(folder / SHOP_FLOOR_EMBEDDINGS),
                       FeatureTable.read(folder, SHOP_FLOOR, "sku.shop_floor"),
                       FeatureTable.read(folder, LOCAL_FEATURES, "sku.local_features"), list(ks),
                       settings if settings.enabled else None)
    result = {}
    if query_photos_path:  # the users' own photos first
        from mlprep.sku.queries import query_photo_accuracy

        result["query_photos"] = query_photo_accuracy(pd.read_parquet(query_photos_path), list(ks), settings.enabled)
    result |= {"shop_floor": floor, **evaluate(index, vectors, meta, queries, query_meta, list(ks)),
               "n_held_out_views": held_out}
    result["factory"] = info["factory"]
    result["recall_at_10"] = info.get("recall_at_10")
    if not info["model"].get("pretrained"):
        result["note"] = "random weights: accuracies measure augmentation robustness of an untrained network only"
    write_json(result, outputs["json"])
    with atomic_path(outputs["plot"]) as tmp:
        plot_accuracy(result, tmp)
    log.info("evaluation: %s", json.dumps(result))
    return result
