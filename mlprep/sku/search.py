"""Querying a built SKU index with images (the `mlprep search-sku` command and `mlprep serve`'s SKU search).

A query goes through the index's own path (decode, render, encode, mlprep.views): its `query_crops` (the centre
square, which is view 0, what the index holds of each catalog photo, and by default the whole photo too), embedded
and averaged. Answers are grouped by SKU: each SKU once, scored by its best view. Where the
index has its catalog photos' local features (`rerank.enabled`), the top candidates are re-ranked geometrically
(mlprep.sku.geometry) and each answer says which score ranked it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import ItemError
from mlprep.io import read_json
from mlprep.indexing import apply_search_params, read_index
from mlprep.sku.augment import query_views, read_image_file, view_transforms
from mlprep.sku.encode import LOCAL_FEATURES, load_encoder
from mlprep.sku.geometry import FeatureTable, Geometry, features_of, rerank
from mlprep.sku.index import rank_skus
from mlprep.views import ViewStage, choose_device_decode, items_per_chunk, pack, prepare_image


class EmptyIndexError(ValueError):
    """The index holds no vectors, so no query can be answered."""


@dataclass(frozen=True)
class QueryFailure:
    query: str
    reason_code: str
    error: str


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    sku_id: str
    name: str
    category: str
    score: float  # what ranked it: embedding_score, plus the geometric term where verified
    embedding_score: float = 0.0
    inliers: int = 0  # of the homography fitted to its best catalog photo (0: not re-ranked or not verified)
    ranked_by: str = "embedding"  # "geometry" when its inliers reached rerank.min_inliers


@dataclass(frozen=True)
class Ranked:
    sku_id: str
    score: float
    embedding_score: float
    inliers: int
    ranked_by: str


def embed_images(encoder, images: list[bytes], max_pixels: int | None = None, crops=("centre",)
                 ) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
    """Embeddings of encoded images (bytes; the format is sniffed from the content, never a name), their positions,
    and (position, reason code, reason) for each that cannot be used. Each image's embedding is the normalised mean
    of its `crops`' (mlprep.sku.augment.QUERY_CROPS). `max_pixels` refuses larger images before they are decoded
    (a decompression bomb is that query's failure)."""
    crops = tuple(crops)
    device_decode = choose_device_decode("auto", encoder.device)
    views = lambda w, h: view_transforms(query_views(crops, w, h), w, h, encoder.image_size)  # noqa: E731
    prepared = [prepare_image(k, data, encoder.image_size, device_decode, views, max_pixels=max_pixels)
                for k, data in enumerate(images)]
    chunk = items_per_chunk(encoder.batch_size, len(crops))
    chunks = [pack(prepared[a : a + chunk]) for a in range(0, len(prepared), chunk)]
    out = ViewStage(encoder, len(crops), chunk).run(chunks)
    vectors = out.vectors
    if len(crops) > 1 and len(vectors):
        vectors = vectors.reshape(-1, len(crops), vectors.shape[1]).mean(axis=1)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors, [i.tag for i in out.items], [(i.tag, *i.error) for i in out.failed]


class SkuSearcher:
    """A built index with the model that made it, ready to answer image queries."""

    def __init__(self, index_path: Path | str, device: str | None = None, threads: int = 2,
                 encoders: dict | None = None, batch_size: int | str = "auto", rerank: bool = True):
        """`encoders`: a cache of built encoders by model identity (a service reloading the index keeps its
        model when the new index was made by the same one). `batch_size`: rows per forward pass; every pass has
        exactly that many (padded), so a query's embedding never depends on the queries it shared a pass with;
        a service answering single queries wants it small (a lone query pays for the whole pass). `rerank`: False
        ranks by embeddings alone even where the index has its photos' local features."""
        index_path = Path(index_path)
        folder = index_path.parent
        self.index = read_index(index_path)
        if self.index.ntotal == 0:
            raise EmptyIndexError(
                f"index {index_path} holds no vectors: the build found no usable image "
                f"(see {folder / 'failures.parquet'})"
            )
        self.info = read_json(folder / "index_info.json")
        apply_search_params(self.index, self.info.get("search_params"))
        self.meta = pd.read_parquet(folder / "metadata.parquet")
        if len(self.meta) != self.index.ntotal:
            raise ValueError(f"{folder / 'metadata.parquet'} has {len(self.meta)} rows, index has {self.index.ntotal}")
        self.skus = self.meta["sku_id"].to_numpy(dtype=object)
        self.sku_info = self.meta.drop_duplicates("sku_id").set_index("sku_id")[["name", "category"]]
        built = self.info.get("model_identity")
        key = json.dumps([built or self.info["model"], self.info["seed"], self.info["precision"], batch_size],
                         sort_keys=True)
        if encoders is not None and key in encoders:
            self.encoder = encoders[key]
        else:
            cfg = {"model": self.info["model"], "encoding_batch_size": batch_size}
            self.encoder = load_encoder(cfg, device or self.info["device"], self.info["precision"], threads,
                                        self.info["seed"])
            if encoders is not None:
                encoders[key] = self.encoder
        if built and self.encoder.identity() != built:
            raise ValueError(f"{folder / 'index_info.json'}: the index was built with {built}, but its model config "
                             f"now loads {self.encoder.identity()} (a changed checkpoint?): rebuild the index")
        self.query_crops = tuple(self.info.get("query_crops") or ("centre",))  # an index from before: centre
        self.geometry, self.photos, self._photo_rows = None, None, {}
        settings = Geometry.from_config(self.info.get("rerank") or {"enabled": False})
        if settings.enabled and rerank and FeatureTable.paths(folder, LOCAL_FEATURES)[0].exists():
            self.geometry = settings
            self.photos = FeatureTable.read(folder, LOCAL_FEATURES, "sku.local_features")  # memory-mapped
            self._photo_rows = self.photos.rows.groupby("sku_id").indices  # sku -> its photos' rows

    def embed_bytes(self, images: list[bytes], max_pixels: int | None = None
                    ) -> tuple[np.ndarray, list[int], list[tuple[int, str, str]]]:
        """embed_images with the query crops the index was built for (what every search embeds)."""
        return embed_images(self.encoder, images, max_pixels, self.query_crops)

    def embed(self, paths: list[Path | str]) -> tuple[np.ndarray, list[int], list[QueryFailure]]:
        """Embeddings of the image files that decode, their positions in `paths`, and a failure for each other."""
        return self._embed(paths)[:3]

    def _embed(self, paths: list[Path | str]) -> tuple[np.ndarray, list[int], list[QueryFailure], list[bytes]]:
        """embed() plus every file's bytes; the failures come in the order of `paths`, one for each position that
        is not among the embedded ones."""
        names = [str(p) for p in paths]
        datas, unread = [], {}
        for k, name in enumerate(names):
            try:
                datas.append(read_image_file(name))
            except ItemError as err:
                datas.append(b"")
                unread[k] = err
        vectors, ok, failed = self.embed_bytes(datas)
        failures = []
        for k, code, reason in sorted(failed):
            err = unread.get(k)
            code, reason = (err.code, str(err)) if err is not None else (code, reason)
            failures.append(QueryFailure(names[k], code, f"{names[k]}: {reason}"))
        return vectors if ok else np.zeros((0, self.index.d), np.float32), ok, failures, datas

    def rank(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The top-k SKUs of each query vector, each SKU once (scored by its best view)."""
        return rank_skus(self.index, self.skus, vectors, k)

    def rank_images(self, images: list[bytes], vectors: np.ndarray, k: int) -> list[list[Ranked]]:
        """The top-k SKUs of each query (its bytes and its embedding), re-ranked geometrically where the index has
        local features: the top `rerank.top_k` candidates are verified against their catalog photos."""
        depth = max(k, self.geometry.top_k) if self.geometry is not None else k
        out = []
        for data, candidates in zip(images, self.rank(vectors, depth) if len(vectors) else []):
            if self.geometry is None:
                out.append([Ranked(sku, score, score, 0, "embedding") for sku, score in candidates[:k]])
                continue
            query = features_of(data, self.geometry)
            rows = rerank(candidates, query, lambda sku: [self.photos.features(r) for r in self._photo_rows.get(sku, [])],
                          self.geometry)
            out.append([Ranked(sku, fused, score, count,
                               "geometry" if count >= self.geometry.min_inliers else "embedding")
                        for sku, fused, score, count in rows[:k]])
        return out

    def search(self, paths: list[Path | str], k: int = 5) -> tuple[list[Hit], list[QueryFailure]]:
        """The top-k SKUs of every query image that decodes, and a failure for each that does not."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors, ok, failed, datas = self._embed(paths)
        hits = []
        for position, row in zip(ok, self.rank_images([datas[p] for p in ok], vectors, k)):
            for rank, r in enumerate(row, start=1):
                extra = self.sku_info.loc[r.sku_id]
                hits.append(Hit(str(paths[position]), rank, r.sku_id, str(extra["name"]), str(extra["category"]),
                                r.score, r.embedding_score, r.inliers, r.ranked_by))
        return hits, failed
