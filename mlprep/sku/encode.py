"""Encode shard: reader (items of a shard) -> mapper (decode + augment in workers, encode in batches) -> writer.

Decoding and augmenting run in DataLoader worker processes, a few images ahead of the model, so
they overlap with the forward passes; the main process only batches views and runs the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mlprep.devices import precision_name
from mlprep.encoders import ClipEncoder, load_clip_encoder
from mlprep.failures import FailureLog, describe_error, write_failures
from mlprep.io import atomic_dir, save_npy, write_parquet
from mlprep.sharding import ShardId
from mlprep.sku.augment import (
    AugmentSettings,
    ViewParams,
    content_hash,
    decode_image,
    original_view,
    read_image_file,
    render_views,
    sample_view,
)
from mlprep.shardlists import ShardLists
from mlprep.sku.catalog import LIST_COLUMNS, ImageItem, items_from_list
from mlprep.stats import ShardStats, scheduler_ids
from mlprep.workers import in_order

log = logging.getLogger(__name__)

# Per view; the merge adds each SKU's name and category from the manifest (a rename re-encodes nothing).
META_COLUMNS = ["item_id", "sku_id", "image", "view", "augmentation", "content_hash"]
# The files of one shard's output folder.
SHARD_FILES = {
    "embeddings": "embeddings.npy",
    "metadata": "metadata.parquet",
    "query_embeddings": "query_embeddings.npy",
    "query_metadata": "query_metadata.parquet",
    "failures": "failures.parquet",
    "stats": "stats.json",
}
INDEX_STREAM = "sku-index-view"
QUERY_STREAM = "sku-query-view"


@dataclass(frozen=True)
class ViewPlan:
    """How many views of each image to make, and from which seed."""

    seed: int
    augment_per_image: int
    queries_per_image: int
    settings: AugmentSettings
    image_size: int

    def views(self, item_id: str, width: int, height: int) -> tuple[list[ViewParams], list[ViewParams]]:
        index = [original_view(width, height)]
        index += [
            sample_view(self.settings, self.seed, INDEX_STREAM, item_id, k, width, height)
            for k in range(1, self.augment_per_image + 1)
        ]
        queries = [
            sample_view(self.settings, self.seed, QUERY_STREAM, item_id, k, width, height)
            for k in range(1, self.queries_per_image + 1)
        ]
        return index, queries


@dataclass
class RenderedItem:
    position: int
    views: torch.Tensor | None  # uint8 [V, 3, S, S]: index views first, then query views
    index_params: list[ViewParams]
    query_params: list[ViewParams]
    content_hash: str = ""
    error: tuple[str, str] | None = None  # (reason code, reason)


class ItemViews(torch.utils.data.Dataset):
    """Decodes and augments one item per __getitem__; errors are returned, not raised, so the shard goes on."""

    def __init__(self, items: list[ImageItem], plan: ViewPlan):
        self.items = items
        self.plan = plan

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> RenderedItem:
        item = self.items[position]
        try:
            data = read_image_file(item.path)
            image = decode_image(data, self.plan.image_size)
            _, height, width = image.shape
            index, queries = self.plan.views(item.item_id, width, height)
            views = render_views(image, index + queries, self.plan.image_size, self.plan.settings.padding_mode)
            return RenderedItem(position, views, index, queries, content_hash(data))
        except Exception as err:  # noqa: BLE001 - any decoder error is this item's failure
            return RenderedItem(position, None, [], [], error=describe_error(err))


def iter_rendered(items: list[ImageItem], plan: ViewPlan, workers: int) -> Iterator[RenderedItem]:
    """Rendered items in shard order; with workers > 0 they are prepared ahead in other processes."""
    return in_order(ItemViews(items, plan), workers)


@dataclass
class EncodedShard:
    index_vectors: np.ndarray
    index_meta: pd.DataFrame
    query_vectors: np.ndarray
    query_meta: pd.DataFrame
    items_ok: int
    seconds_encoding: float


def _meta_rows(item: ImageItem, params: list[ViewParams], digest: str) -> list[dict]:
    return [
        {
            "item_id": item.item_id,
            "sku_id": item.sku_id,
            "image": item.image,
            "view": p.view,
            "augmentation": json.dumps(p.as_dict(), sort_keys=True),
            "content_hash": digest,
        }
        for p in params
    ]


def _meta_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=META_COLUMNS)
    return frame.astype({c: "string" for c in META_COLUMNS if c != "view"} | {"view": "int32"})


def encode_items(
    items: list[ImageItem],
    plan: ViewPlan,
    encoder: ClipEncoder,
    failures: FailureLog,
    workers: int = 1,
    progress: TextIO | None = None,
    on_encoded: Callable[[], None] | None = None,
) -> EncodedShard:
    """Encode the index and query views of every item; bad items go to `failures`.

    `on_encoded` is called after each forward pass (the job's stats time its first one)."""
    # Views wait for a full batch in one staging buffer that is reused for the whole shard: a fresh
    # torch.cat per batch cost ~37 ms on a 16-core GPU host (new pages, many threads), capping a GPU
    # shard at ~550 views/s while the encoder alone ran ~8,500; copying into reused pages took 6 ms
    # per batch against torch.cat's 136 ms on a loaded 2-core VM.
    staging: np.ndarray | None = None
    n_pending = 0
    chunks: list[np.ndarray] = []
    is_query: list[bool] = []
    index_rows: list[dict] = []
    query_rows: list[dict] = []
    ok = 0
    encode_seconds = 0.0

    def flush(final: bool) -> None:
        nonlocal n_pending, encode_seconds
        take = n_pending if final else (n_pending // encoder.batch_size) * encoder.batch_size
        if take == 0:
            return
        started = time.perf_counter()
        chunks.append(encoder.encode_images(torch.from_numpy(staging[:take])))
        encode_seconds += time.perf_counter() - started
        if on_encoded is not None:
            on_encoded()
        rest = n_pending - take
        staging[:rest] = staging[take:n_pending]
        n_pending = rest

    bar = tqdm(total=len(items), desc="encode images", unit="img", file=progress, mininterval=2.0)
    for rendered in iter_rendered(items, plan, workers):
        item = items[rendered.position]
        bar.update(1)
        if rendered.error is not None:
            failures.record(item.item_id, item.path, "decode", *rendered.error)
            continue
        ok += 1
        views = rendered.views.numpy()
        if staging is None or n_pending + len(views) > len(staging):
            grown = np.empty((max(n_pending + len(views), encoder.batch_size + len(views)), *views.shape[1:]),
                             dtype=np.uint8)
            if staging is not None:
                grown[:n_pending] = staging[:n_pending]
            staging = grown
        staging[n_pending : n_pending + len(views)] = views
        n_pending += len(views)
        is_query += [False] * len(rendered.index_params) + [True] * len(rendered.query_params)
        index_rows += _meta_rows(item, rendered.index_params, rendered.content_hash)
        query_rows += _meta_rows(item, rendered.query_params, rendered.content_hash)
        if n_pending >= encoder.batch_size:
            flush(final=False)
    flush(final=True)
    bar.close()

    dim = encoder.dim
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    mask = np.asarray(is_query, dtype=bool)
    return EncodedShard(
        index_vectors=np.ascontiguousarray(vectors[~mask]) if len(mask) else vectors,
        index_meta=_meta_frame(index_rows),
        query_vectors=np.ascontiguousarray(vectors[mask]) if len(mask) else vectors,
        query_meta=_meta_frame(query_rows),
        items_ok=ok,
        seconds_encoding=encode_seconds,
    )


def write_encoded_shard(shard: EncodedShard, folder: Path) -> None:
    save_npy(shard.index_vectors, folder / SHARD_FILES["embeddings"])
    write_parquet(shard.index_meta, folder / SHARD_FILES["metadata"])
    save_npy(shard.query_vectors, folder / SHARD_FILES["query_embeddings"])
    write_parquet(shard.query_meta, folder / SHARD_FILES["query_metadata"])


def load_encoder(cfg: dict, device_spec: str, precision_spec: str, threads: int, seed: int) -> ClipEncoder:
    return load_clip_encoder(cfg["model"], cfg["encoding_batch_size"], device_spec, precision_spec, threads, seed)


def view_plan(cfg: dict, seed: int, image_size: int) -> ViewPlan:
    return ViewPlan(
        seed=seed,
        augment_per_image=cfg["augment_per_image"],
        queries_per_image=cfg["eval"]["queries_per_image"],
        settings=AugmentSettings.from_config(cfg["augment"]),
        image_size=image_size,
    )


def encode_shard(
    shard_text: str,
    list_path: Path | str,
    cfg: dict,
    seed: int,
    device_spec: str,
    precision_spec: str,
    continue_on_error: bool,
    threads: int,
    out_dir: Path | str,
    progress: TextIO | None = None,
) -> dict:
    """Encode the images of one shard list into the shard's folder (written whole or not at all)."""
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    items = items_from_list(ShardLists.read(list_path, LIST_COLUMNS), shard.index)
    encoder = load_encoder(cfg, device_spec, precision_spec, threads, seed)
    plan = view_plan(cfg, seed, encoder.image_size)
    failures = FailureLog(continue_on_error)
    encoded = encode_items(items, plan, encoder, failures, workers=cfg["decode_workers"], progress=progress,
                           on_encoded=stats.first_item_done)
    stats.ok, stats.failed = encoded.items_ok, len(failures)
    stats.counts = {"index_views": len(encoded.index_vectors), "query_views": len(encoded.query_vectors)}
    stats.counts["views"] = stats.counts["index_views"] + stats.counts["query_views"]
    stats.extra = {
        "encode_seconds": round(encoded.seconds_encoding, 3),
        "device": str(encoder.device),
        "precision": precision_name(encoder.dtype),
        "threads": threads,
        "decode_workers": cfg["decode_workers"],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **scheduler_ids(),
    }
    with atomic_dir(out_dir) as folder:
        write_encoded_shard(encoded, folder)
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data
