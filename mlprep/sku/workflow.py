"""What the Snakemake DAG needs to know about sku_index: shard lists, their fingerprints, rerun settings.

Each shard job's inputs are the image files of that shard and its params hold its item list:
adding SKUs changes the inputs and params of only the shards they land in, so Snakemake reruns
only those (plus the merge), and a dry-run says so. Shard jobs deliberately do not depend on the
manifest file, which changes whenever any SKU does.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cached_property

from mlprep.sharding import ShardId, shard_names
from mlprep.sku.catalog import Catalog, ImageItem, read_catalog


class SkuWorkflow:
    def __init__(self, config: dict, results: str = "results"):
        self.config = config
        self.cfg = config["sku_index"]
        self.dir = f"{results}/sku_index"
        self.shards = shard_names(self.cfg["shards"])

    @cached_property
    def catalog(self) -> Catalog:
        """The catalog as the DAG sees it; the manifest job writes the same list and validates it."""
        return read_catalog(self.cfg["sku_data"], self.cfg["images_dir"], self.cfg["shards"])

    def _items(self, wildcards) -> list[ImageItem]:
        return self.catalog.shard_items(ShardId.parse(wildcards.shard).index)

    def shard_images(self, wildcards) -> list[str]:
        return [item.path for item in self._items(wildcards)]

    def shard_items(self, wildcards) -> list[dict]:
        return [asdict(item) for item in self._items(wildcards)]

    def encode_settings(self, wildcards) -> dict:
        """The settings that change a shard's vectors: a change reruns every shard (params trigger)."""
        return {
            "seed": self.config["seed"],
            "precision": self.config["precision"],
            "model": self.cfg["model"],
            "augment": self.cfg["augment"],
            "augment_per_image": self.cfg["augment_per_image"],
            "queries_per_image": self.cfg["eval"]["queries_per_image"],
            "encoding_batch_size": self.cfg["encoding_batch_size"],
        }

    def build_settings(self, wildcards) -> dict:
        """The settings that change the merged index and checks: a change reruns the merge only."""
        return {k: self.cfg[k] for k in ("index", "duplicate_images", "confusable_pairs", "confusable_sample")}

    def shard_files(self, name: str) -> list[str]:
        return [f"{self.dir}/shards/{shard}/{name}" for shard in self.shards]
