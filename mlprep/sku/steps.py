"""The sku_index pipeline's cheap steps (manifest, index, evaluation); scripts/ only unpack `snakemake` and call these.

This module does not import torch or open_clip (5 s of start-up per job); the encode step lives in
mlprep.sku.encode.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from mlprep.failures import FailureLog, read_failures, write_failures
from mlprep.io import atomic_path, load_npy, read_json, save_npy, write_json, write_parquet
from mlprep.sku.catalog import read_catalog
from mlprep.sku.evaluate import evaluate, plot_accuracy
from mlprep.sku.index import (
    EXACT_FACTORIES,
    apply_search_params,
    build_index,
    merge_shards,
    read_index,
    recall_at_k,
    write_index,
)

log = logging.getLogger(__name__)


def manifest(sku_data, images_dir, n_shards: int, continue_on_error: bool, out_items, out_failures) -> None:
    catalog = read_catalog(sku_data, images_dir, n_shards)
    failures = FailureLog(continue_on_error)
    failures.extend(catalog.failures)
    frame = catalog.items_frame()
    write_parquet(frame, out_items)
    write_failures(failures.records, out_failures)
    log.info("%d image items from %s, %d failures, %d shards", len(frame), sku_data, len(failures), n_shards)


def build(
    embedding_paths: list,
    metadata_paths: list,
    query_embedding_paths: list,
    failure_paths: list,
    cfg: dict,
    seed: int,
    device_spec: str,
    precision_spec: str,
    threads: int,
    outputs: dict,
) -> dict:
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    vectors, meta = merge_shards(embedding_paths, metadata_paths)
    queries = np.concatenate([load_npy(p) for p in query_embedding_paths]) if query_embedding_paths else vectors[:0]
    index_cfg = cfg["index"]
    index = build_index(vectors, index_cfg["factory"], seed, index_cfg["train_sample"])
    apply_search_params(index, index_cfg.get("search_params"))
    exact = index_cfg["factory"] in EXACT_FACTORIES
    info = {
        "factory": index_cfg["factory"],
        "metric": "inner_product",
        "search_params": index_cfg.get("search_params"),
        "ntotal": int(index.ntotal),
        "dim": int(vectors.shape[1]),
        "n_skus": int(meta["sku_id"].nunique()) if len(meta) else 0,
        "augment_per_image": cfg["augment_per_image"],
        "model": cfg["model"],
        "seed": seed,  # also seeds random model weights: the search command rebuilds the same model
        "device": device_spec,
        "precision": precision_spec,
        "exact": exact,
        "recall_at_10": None if exact else recall_at_k(index, vectors, queries[: index_cfg["recall_sample"]], 10),
    }
    failures = read_failures(failure_paths)
    write_index(index, outputs["index"])
    save_npy(vectors, outputs["embeddings"])
    write_parquet(meta, outputs["metadata"])
    write_parquet(failures, outputs["failures"])
    info["n_failures"] = int(len(failures))
    write_json(info, outputs["info"])
    log.info("index: %s", info)
    return info


def evaluate_index(index_path, embeddings_path, metadata_path, info_path, query_paths: list, query_meta_paths: list, ks, outputs: dict) -> dict:
    index = read_index(index_path)
    info = read_json(info_path)
    apply_search_params(index, info.get("search_params"))
    vectors = load_npy(embeddings_path)
    meta = pd.read_parquet(metadata_path)
    queries, query_meta = merge_shards(query_paths, query_meta_paths)
    result = evaluate(index, vectors, meta, queries, query_meta, list(ks))
    result["factory"] = info["factory"]
    result["recall_at_10"] = info.get("recall_at_10")
    if not info["model"].get("pretrained"):
        result["note"] = "random CLIP weights: accuracies measure augmentation robustness of an untrained network only"
    write_json(result, outputs["json"])
    with atomic_path(outputs["plot"]) as tmp:
        plot_accuracy(result, tmp)
    log.info("evaluation: %s", json.dumps(result))
    return result
