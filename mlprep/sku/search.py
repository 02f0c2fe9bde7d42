"""Querying a built SKU index with image files (the `mlprep search-sku` command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.io import read_json
from mlprep.sku.augment import AugmentSettings
from mlprep.indexing import apply_search_params, read_index
from mlprep.sku.index import rank_skus
from mlprep.sku.encode import ViewPlan, image_chunks, load_encoder, view_stage


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
    score: float


class SkuSearcher:
    """A built index with the model that made it, ready to answer image queries."""

    def __init__(self, index_path: Path | str, device: str | None = None, threads: int = 2):
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
        cfg = {"model": self.info["model"], "encoding_batch_size": "auto"}
        self.encoder = load_encoder(cfg, device or self.info["device"], self.info["precision"], threads, self.info["seed"])
        built = self.info.get("model_identity")
        if built and self.encoder.identity() != built:
            raise ValueError(f"{folder / 'index_info.json'}: the index was built with {built}, but its model config "
                             f"now loads {self.encoder.identity()} (a changed checkpoint?): rebuild the index")

    def embed(self, paths: list[Path | str]) -> tuple[np.ndarray, list[int], list[QueryFailure]]:
        """Embeddings of the images that decode, their positions in `paths`, and a failure for each other.
        A query is view 0 of the index's own path (decode, centre square crop, encode): what the index holds."""
        plan = ViewPlan(0, 0, 0, AugmentSettings(), self.encoder.image_size)
        names = [str(p) for p in paths]
        chunks = image_chunks(names, names, plan, self.encoder.batch_size, 0, self.encoder.device)
        out = view_stage(self.encoder, plan).run(chunks)
        failed = [QueryFailure(names[i.tag], i.error[0], f"{names[i.tag]}: {i.error[1]}") for i in out.failed]
        vectors = out.vectors if len(out.items) else np.zeros((0, self.index.d), np.float32)
        return vectors, [i.tag for i in out.items], failed

    def search(self, paths: list[Path | str], k: int = 5) -> tuple[list[Hit], list[QueryFailure]]:
        """The top-k SKUs of every query image that decodes, and a failure for each that does not."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        vectors, ok, failed = self.embed(paths)
        hits = []
        for position, row in zip(ok, rank_skus(self.index, self.skus, vectors, k)):
            for rank, (sku, score) in enumerate(row, start=1):
                extra = self.sku_info.loc[sku]
                hits.append(Hit(str(paths[position]), rank, sku, str(extra["name"]), str(extra["category"]), score))
        return hits, failed
