"""Encode shard: reader (items of a shard) -> CPU workers (read, decode or pass JPEGs on, view numbers) ->
the model's device (decode JPEGs, render every view, encode in batches) -> writer.

The workers prepare chunks of images a few chunks ahead of the device, in other processes, so reading and
decoding overlap with rendering and the forward passes (mlprep.views: the same path for every device).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mlprep.devices import job_device, precision_name, resolve_batch_size, select_precision, start_context
from mlprep.encoders import ImageEncoder, ModelSpec, build_encoder, image_size_of
from mlprep.failures import FailureLog, describe_error, write_failures
from mlprep.io import atomic_dir, save_npy, write_parquet
from mlprep.sharding import ShardId
from mlprep.sku.augment import (
    AugmentSettings,
    ViewParams,
    blur_radius,
    content_hash,
    original_view,
    sample_view,
    view_transforms,
)
from mlprep.shardlists import ShardLists
from mlprep.sku.catalog import LIST_COLUMNS, ImageItem, items_from_list
from mlprep.sku.geometry import FeatureTable, Features, Geometry, features_of
from mlprep.sku.shopfloor import ShopFloor, photo_for_queries, shop_floor_query, takes_queries
from mlprep.sources import ItemReader
from mlprep.stats import ShardStats, scheduler_ids
from mlprep.workers import each_in_threads, resolve_workers
from mlprep.views import (
    DeviceImages,
    PreparedChunk,
    PreparedImage,
    ViewRenderer,
    ViewStage,
    choose_device_decode,
    chunk_ranges,
    items_per_chunk,
    iter_chunks,
    pack,
    prepare_image,
)

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
# Local features (FeatureTable names in the shard's folder): catalog photos, and the shop-floor queries' own
LOCAL_FEATURES = "local_features"
SHOP_FLOOR = "shop_floor"
SHOP_FLOOR_EMBEDDINGS = "shop_floor_embeddings.npy"
SHOP_FLOOR_FLUSH = 256  # shop-floor queries are embedded in groups of this many while the shard runs
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
    geometry: Geometry | None = None  # local features of each photo, for geometric re-ranking
    shop_floor: ShopFloor | None = None  # shop-floor queries of each photo, for the eval
    query_crops: tuple[str, ...] = ("centre",)  # what a query's embedding averages, as a search embeds it
    shop_floor_share: float = 1.0  # of the photos that get shop-floor queries (mlprep.sku.shopfloor.sample_share)

    @property
    def views_per_item(self) -> int:
        return 1 + self.augment_per_image + self.queries_per_image

    def views(self, item_id: str, width: int, height: int) -> tuple[list[ViewParams], list[ViewParams]]:
        """Index views (the original first) and query views, from the image's displayed size."""
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


class ShardImages(torch.utils.data.Dataset):
    """Chunk k of the images: each read (a file, a tar member or a parquet cell: mlprep.sources), decoded or
    passed on as JPEG bytes, with its views' numbers. Errors are returned as the item's error, never raised, so
    the shard goes on."""

    def __init__(self, locations: list, ids: list[str], plan: ViewPlan, chunk: int, device_decode: bool,
                 reader: ItemReader | None = None):
        self.locations = [(x,) if isinstance(x, (str, Path)) else tuple(x) for x in locations]
        self.ids, self.plan, self.device_decode = ids, plan, device_decode
        self.reader = reader or ItemReader(what="image file")
        self.ranges = chunk_ranges(len(locations), chunk)

    def __len__(self) -> int:
        return len(self.ranges)

    def _read(self, position: int) -> tuple[int, bytes, float, tuple | None]:
        """The item's bytes, one item after the other (the reader keeps open containers: one thread uses it)."""
        started = time.perf_counter()
        try:
            return position, self.reader.read(*self.locations[position]), time.perf_counter() - started, None
        except Exception as err:  # noqa: BLE001
            return position, b"", 0.0, describe_error(err)

    def _prepare(self, read: tuple[int, bytes, float, tuple | None]):
        """An item's work from its bytes: the views' numbers, the decode, the extras (each item on its own, so the
        items of a chunk can be prepared side by side: mlprep.workers.each_in_threads)."""
        position, data, read_s, error = read
        if error is not None:
            return PreparedImage(position, error=error), b""
        plan = self.plan
        params: dict = {}

        def views(width: int, height: int):
            params["index"], params["query"] = plan.views(self.ids[position], width, height)
            return view_transforms(params["index"] + params["query"], width, height, plan.image_size)

        started = time.perf_counter()
        item, payload = prepare_image(position, data, plan.image_size, self.device_decode, views, content_hash)
        extras = {"seconds": {"read": read_s, "views": time.perf_counter() - started}}
        if item.error is None:
            try:
                self._extras(data, self.ids[position], extras)
            except Exception as err:  # noqa: BLE001 - a photo that decodes for its views but not in full
                item, payload = PreparedImage(position, error=describe_error(err)), b""
        # each view's number and parameters as the index's table holds them, made here: a GPU job's readers are
        # processes, and its main thread, which feeds the device, would spend ~30 us a view on them
        item.extra = ([(p.view, p.as_json()) for p in params.get("index", [])],
                      [(p.view, p.as_json()) for p in params.get("query", [])], extras)
        return item, payload

    def _extras(self, data: bytes, item_id: str, out: dict) -> None:
        """Adds to `out` what the photo's bytes give besides its views, here where they are read: its local features
        and its shop-floor queries (with theirs), and to out["seconds"] what each took."""
        plan, seconds = self.plan, out["seconds"]
        if plan.geometry is not None:
            started = time.perf_counter()
            out["features"] = features_of(data, plan.geometry)
            seconds["local_features"] = time.perf_counter() - started
        if (plan.shop_floor is not None and plan.shop_floor.queries_per_image
                and takes_queries(plan.seed, item_id, plan.shop_floor_share)):
            started = time.perf_counter()
            photo = photo_for_queries(data)
            queries = [shop_floor_query(photo, plan.shop_floor, plan.seed, item_id, k)
                       for k in range(plan.shop_floor.queries_per_image)]
            features = [features_of(q, plan.geometry) for q in queries] if plan.geometry is not None else []
            out["shop_floor"] = (queries, features)
            seconds["shop_floor"] = time.perf_counter() - started

    def __getitem__(self, k: int) -> PreparedChunk:
        start, stop = self.ranges[k]
        return pack(each_in_threads(self._prepare, [self._read(position) for position in range(start, stop)]))


def image_chunks(locations: list, ids: list[str], plan: ViewPlan, batch_size: int, workers: int,
                 device: torch.device, jpeg_decoder: str = "auto",
                 reader: ItemReader | None = None) -> Iterator[PreparedChunk]:
    """The shard's images (paths, or ImageItem.location tuples) as prepared chunks, in order; the workers start
    at once."""
    dataset = ShardImages(locations, ids, plan, items_per_chunk(batch_size, plan.views_per_item),
                          choose_device_decode(jpeg_decoder, device), reader)
    return iter_chunks(dataset, workers, pin=device.type == "cuda")


def view_stage(encoder: ImageEncoder, plan: ViewPlan) -> ViewStage:
    return ViewStage(encoder, plan.views_per_item, items_per_chunk(encoder.batch_size, plan.views_per_item),
                     plan.settings.padding_mode, blur_radius(plan.settings))


def item_chunks(items: list[ImageItem], plan: ViewPlan, device: torch.device, jpeg_decoder: str = "cpu",
                chunk: int = 8) -> ShardImages:
    """The items as the shard's readers prepare them, `chunk` items a chunk (chunk k is `[k]`, made in this process)."""
    return ShardImages([i.location for i in items], [i.item_id for i in items], plan, chunk,
                       choose_device_decode(jpeg_decoder, device))


def chunk_renderer(plan: ViewPlan, device: torch.device, chunk: int = 8) -> Callable[[PreparedChunk], torch.Tensor]:
    """A function from a prepared chunk of at most `chunk` items to their views, rendered on `device` as the encode
    path renders them: uint8 [views, 3, S, S], item after item."""
    images = DeviceImages(device, plan.image_size)
    renderer = ViewRenderer(plan.image_size, chunk * plan.views_per_item, device, plan.settings.padding_mode,
                            blur_radius(plan.settings))

    def render(prepared: PreparedChunk) -> torch.Tensor:
        views, counts = renderer(images(prepared), [i.transforms for i in prepared.items],
                                 [(i.width, i.height) for i in prepared.items])
        return views[: sum(counts)]

    return render


def render_items(items: list[ImageItem], plan: ViewPlan, device: torch.device, jpeg_decoder: str = "cpu",
                 chunk: int = 8) -> torch.Tensor:
    """Every view of every item that decodes, rendered as the encode path renders them: uint8 [n, 3, S, S]
    (for benchmarks of the encoder alone and for equivalence checks)."""
    dataset = item_chunks(items, plan, device, jpeg_decoder, chunk)
    render = chunk_renderer(plan, device, chunk)
    return torch.cat([render(dataset[k]) for k in range(len(dataset))])


@dataclass
class EncodedShard:
    index_vectors: np.ndarray
    index_meta: pd.DataFrame
    query_vectors: np.ndarray
    query_meta: pd.DataFrame
    items_ok: int
    seconds_encoding: float
    local_features: FeatureTable | None = None
    shop_floor_vectors: np.ndarray | None = None
    shop_floor: FeatureTable | None = None  # a row per shop-floor query, with its local features
    reader_seconds: dict | None = None  # CPU seconds the readers spent, by part, summed over the items
    shop_floor_embed_seconds: float = 0.0  # this process's time embedding shop-floor queries


def _meta_rows(item: ImageItem, views: list[tuple[int, str]], digest: str) -> list[dict]:
    """A table row per view: `views` as the readers list them, (view, its parameters as JSON)."""
    return [
        {
            "item_id": item.item_id,
            "sku_id": item.sku_id,
            "image": item.image,
            "view": view,
            "augmentation": augmentation,
            "content_hash": digest,
        }
        for view, augmentation in views
    ]


def _meta_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=META_COLUMNS)
    return frame.astype({c: "string" for c in META_COLUMNS if c != "view"} | {"view": "int32"})


def encode_items(
    items: list[ImageItem],
    plan: ViewPlan,
    encoder: ImageEncoder,
    failures: FailureLog,
    workers: int = 1,
    progress: TextIO | None = None,
    on_encoded: Callable[[], None] | None = None,
    chunks: Iterator[PreparedChunk] | None = None,
    jpeg_decoder: str = "auto",
) -> EncodedShard:
    """Encode the index and query views of every item; bad items go to `failures`.

    `chunks` are the items prepared by image_chunks (made here when not given); `on_encoded` is called
    after each forward pass is queued (the job's stats time its first one)."""
    if chunks is None:
        chunks = image_chunks([i.location for i in items], [i.item_id for i in items], plan, encoder.batch_size,
                              workers, encoder.device, jpeg_decoder)
    bar = tqdm(total=len(items), desc="encode images", unit="img", file=progress, mininterval=2.0)
    photo_features: list[tuple[dict, Features]] = []
    queries = _ShopFloorQueries(encoder, plan.query_crops)
    reader_seconds: Counter = Counter()  # seconds by part

    def seen(prepared: PreparedImage) -> None:
        bar.update(1)
        item = items[prepared.tag]
        if prepared.error is not None:
            failures.record(item.item_id, item.where, "decode", *prepared.error)
            return
        extras = prepared.extra[2] if prepared.extra else {}
        reader_seconds.update(extras.get("seconds", {}))
        row = {"item_id": item.item_id, "sku_id": item.sku_id, "image": item.image}
        if "features" in extras:
            photo_features.append((row, extras["features"]))
        if "shop_floor" in extras:
            queries.add(row, *extras["shop_floor"])

    out = view_stage(encoder, plan).run(chunks, on_item=seen, on_encoded=on_encoded)
    queries.flush()
    bar.close()
    index_rows: list[dict] = []
    query_rows: list[dict] = []
    is_query: list[bool] = []
    for prepared in out.items:
        index_views, query_views, _ = prepared.extra
        is_query += [False] * len(index_views) + [True] * len(query_views)
        index_rows += _meta_rows(items[prepared.tag], index_views, prepared.digest)
        query_rows += _meta_rows(items[prepared.tag], query_views, prepared.digest)
    mask = np.asarray(is_query, dtype=bool)
    vectors = out.vectors
    return EncodedShard(
        index_vectors=np.ascontiguousarray(vectors[~mask]) if len(mask) else vectors,
        index_meta=_meta_frame(index_rows),
        query_vectors=np.ascontiguousarray(vectors[mask]) if len(mask) else vectors,
        query_meta=_meta_frame(query_rows),
        items_ok=len(out.items),
        seconds_encoding=out.encode_seconds,
        local_features=FeatureTable.build(photo_features, "sku.local_features") if plan.geometry else None,
        shop_floor_vectors=queries.vectors() if plan.shop_floor else None,
        shop_floor=queries.table() if plan.shop_floor else None,
        reader_seconds={part: round(seconds, 2) for part, seconds in reader_seconds.items()},
        shop_floor_embed_seconds=round(queries.seconds, 2),
    )


class _ShopFloorQueries:
    """Shop-floor queries as the shard's readers make them, embedded in groups while the shard runs (memory
    stays bounded), through the path a search takes (mlprep.sku.search.embed_images)."""

    def __init__(self, encoder: ImageEncoder, crops: tuple[str, ...]):
        self.encoder, self.crops = encoder, crops
        self.waiting: list[tuple[dict, bytes, Features | None]] = []
        self.entries: list[tuple[dict, Features]] = []
        self.parts: list[np.ndarray] = []
        self.seconds = 0.0

    def add(self, row: dict, queries: list[bytes], features: list[Features]) -> None:
        for k, data in enumerate(queries):
            self.waiting.append(({**row, "query": k}, data, features[k] if features else None))
        if len(self.waiting) >= SHOP_FLOOR_FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        from mlprep.sku.search import embed_images  # here: a shard without shop-floor queries never imports it

        started = time.perf_counter()
        vectors, ok, _ = embed_images(self.encoder, [data for _, data, _ in self.waiting], crops=self.crops)
        self.seconds += time.perf_counter() - started
        for position in ok:  # a query that does not decode (it always should) is left out
            row, _, features = self.waiting[position]
            self.entries.append((row, features if features is not None else Features.empty()))
        self.parts.append(vectors[: len(ok)])
        self.waiting.clear()

    def vectors(self) -> np.ndarray:
        parts = [p for p in self.parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)

    def table(self) -> FeatureTable:
        return FeatureTable.build(self.entries, "sku.shop_floor")


def write_encoded_shard(shard: EncodedShard, folder: Path) -> None:
    save_npy(shard.index_vectors, folder / SHARD_FILES["embeddings"])
    write_parquet(shard.index_meta, folder / SHARD_FILES["metadata"], "sku.shard_views")
    save_npy(shard.query_vectors, folder / SHARD_FILES["query_embeddings"])
    write_parquet(shard.query_meta, folder / SHARD_FILES["query_metadata"], "sku.shard_views")
    if shard.local_features is not None:
        shard.local_features.write(folder, LOCAL_FEATURES)
    if shard.shop_floor is not None:
        shard.shop_floor.write(folder, SHOP_FLOOR)
        save_npy(shard.shop_floor_vectors, folder / SHOP_FLOOR_EMBEDDINGS)


def load_encoder(cfg: dict, device_spec: str, precision_spec: str, threads: int, seed: int) -> ImageEncoder:
    device = job_device(device_spec, threads)
    return build_encoder(ModelSpec.from_config(cfg["model"], seed), device, select_precision(precision_spec, device),
                       resolve_batch_size(cfg["encoding_batch_size"], device))


def _extras_settings(cfg: dict) -> tuple[Geometry | None, ShopFloor | None]:
    """The local features and shop-floor queries the readers make besides the views (None: not made)."""
    rerank = Geometry.from_config(cfg.get("rerank"))
    shop_floor = ShopFloor.from_config(cfg["eval"].get("shop_floor"))
    return rerank if rerank.enabled else None, shop_floor if shop_floor.queries_per_image else None


def readers_do_extras(cfg: dict) -> bool:
    """Whether the readers do more with each photo than its views: tens of milliseconds of CPU a photo (local
    features ~34 ms, a shop-floor query and its features ~50 ms on a 640x480 photo, one Xeon core) instead of 1-2."""
    return any(setting is not None for setting in _extras_settings(cfg))


def view_plan(cfg: dict, seed: int, image_size: int, shop_floor_share: float = 1.0) -> ViewPlan:
    """The shard's views and extras from the sku_index config; `shop_floor_share`: what the workflow drew from the
    catalog's size (mlprep.sku.workflow: eval.shop_floor.max_queries)."""
    geometry, shop_floor = _extras_settings(cfg)
    return ViewPlan(
        seed=seed,
        augment_per_image=cfg["augment_per_image"],
        queries_per_image=cfg["eval"]["queries_per_image"],
        settings=AugmentSettings.from_config(cfg["augment"]),
        image_size=image_size,
        geometry=geometry,
        shop_floor=shop_floor,
        query_crops=tuple(cfg["query_crops"]),
        shop_floor_share=shop_floor_share,
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
    jpeg_decoder: str = "auto",
    storage: dict | None = None,
    shop_floor_share: float = 1.0,
) -> dict:
    """Encode the images of one shard list into the shard's folder (written whole or not at all); `storage`: the
    object_storage settings, for images in object storage; `shop_floor_share`: of the photos that get shop-floor
    queries (the workflow's, from the catalog's size).

    Start-up overlaps: the readers start (and read ahead) before the model is built, where the model's input
    size is known from its config; `stats.json` says where the start-up time went (`startup_steps`)."""
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    stats.mark("imports")
    items = items_from_list(ShardLists.read(list_path, LIST_COLUMNS), shard.index)
    device = job_device(device_spec, threads)
    spec = ModelSpec.from_config(cfg["model"], seed)
    batch = resolve_batch_size(cfg["encoding_batch_size"], device)
    size = image_size_of(spec)
    paths, ids = [i.location for i in items], [i.item_id for i in items]
    reader = ItemReader(cfg.get("parquet_column", "auto"), what="image file", storage=storage)
    workers = resolve_workers(cfg["decode_workers"], device, threads, heavy=readers_do_extras(cfg))
    chunks = None
    if size is not None:
        plan = view_plan(cfg, seed, size, shop_floor_share)
        chunks = image_chunks(paths, ids, plan, batch, workers, device, jpeg_decoder, reader)
        stats.mark("readers_started")
    context = start_context(device)
    encoder = build_encoder(spec, device, select_precision(precision_spec, device), batch)
    if context is not None:
        context.join()
    stats.mark("model_built")
    if encoder.warm_up():
        stats.mark("kernels_loaded")
    if chunks is None:
        plan = view_plan(cfg, seed, encoder.image_size, shop_floor_share)
        chunks = image_chunks(paths, ids, plan, batch, workers, device, jpeg_decoder, reader)
    failures = FailureLog(continue_on_error)
    encoded = encode_items(items, plan, encoder, failures, progress=progress, on_encoded=stats.first_item_done,
                           chunks=chunks)
    stats.ok, stats.failed = encoded.items_ok, len(failures)
    stats.counts = {"index_views": len(encoded.index_vectors), "query_views": len(encoded.query_vectors)}
    stats.counts["views"] = stats.counts["index_views"] + stats.counts["query_views"]
    stats.extra = {
        "encode_seconds": round(encoded.seconds_encoding, 3),
        "model": encoder.identity(),
        "device": str(encoder.device),
        "precision": precision_name(encoder.dtype),
        "encoding_batch_size": batch,
        "jpeg_decoder": "device" if choose_device_decode(jpeg_decoder, device) else "cpu",
        "threads": threads,
        "decode_workers": workers,
        # where the readers' CPU went (summed over the items, spread over the decode workers) and this process's
        # time embedding shop-floor queries: on a GPU, what the feed can give (docs/gpu.md)
        "reader_seconds": encoded.reader_seconds,
        "shop_floor_share": shop_floor_share,
        "shop_floor_embed_seconds": encoded.shop_floor_embed_seconds,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        **scheduler_ids(),
    }
    with atomic_dir(out_dir) as folder:
        write_encoded_shard(encoded, folder)
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data
