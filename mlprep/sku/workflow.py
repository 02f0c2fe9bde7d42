"""What the Snakemake DAG needs to know about sku_index (mlprep.shardwork): shard lists, their fingerprints,
and the settings whose change reruns the shards or only the merge."""

from __future__ import annotations

from mlprep.shardlists import cached_count
from mlprep.shardwork import ShardedPipeline
from mlprep.sku.catalog import LIST_COLUMNS, count_images


class SkuWorkflow(ShardedPipeline):
    pipeline = "sku_index"
    columns = LIST_COLUMNS

    def count_items(self) -> int:
        return cached_count(self.lists_dir, self.cfg["sku_data"], count_images)

    def sync_payload(self) -> dict:
        return {"sku_data": self.cfg["sku_data"], "images_dir": self.cfg["images_dir"]}

    def encode_settings(self) -> dict:
        """The settings that change a shard's vectors: a change reruns every shard (params trigger)."""
        return {
            "seed": self.config["seed"],
            "precision": self.config["precision"],
            "jpeg_decoder": self.config["jpeg_decoder"],
            "model": self.cfg["model"],
            "augment": self.cfg["augment"],
            "augment_per_image": self.cfg["augment_per_image"],
            "queries_per_image": self.cfg["eval"]["queries_per_image"],
            "shop_floor": self.cfg["eval"]["shop_floor"],
            "local_features": {k: v for k, v in self.cfg["rerank"].items()
                               if k in ("enabled", "max_features", "max_side")},
            "encoding_batch_size": self.cfg["encoding_batch_size"],
        }

    def build_settings(self) -> dict:
        """The settings that change the merged index and checks: a change reruns the merge only."""
        return {k: self.cfg[k] for k in ("index", "duplicate_images", "confusable_pairs", "confusable_sample",
                                         "rerank")}
