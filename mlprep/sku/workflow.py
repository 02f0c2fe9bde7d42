"""What the Snakemake DAG needs to know about sku_index (mlprep.shardwork): shard lists, their fingerprints,
and the settings whose change reruns the shards or only the merge."""

from __future__ import annotations

from mlprep.shardlists import cached_count, recorded_count
from mlprep.shardwork import ShardedPipeline
from mlprep.sku.catalog import LIST_COLUMNS, count_images


class SkuWorkflow(ShardedPipeline):
    pipeline = "sku_index"
    columns = LIST_COLUMNS

    def count_items(self) -> int:
        return cached_count(self.lists_dir, self.cfg["sku_data"], count_images)

    def sync_payload(self) -> dict:
        return {"sku_data": self.cfg["sku_data"], "source": self.source}

    @property
    def source(self) -> dict:
        """Where the images lie (mlprep.sku.catalog.Source): a folder of files, of tars or of parquet files."""
        return {**{k: self.cfg[k] for k in ("images_dir", "input_format", "parquet_column", "parquet_key")},
                "storage": self.config.get("object_storage")}

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
            # max_queries acts through the share it gives: a new limit that keeps the share reruns nothing
            "shop_floor": {k: v for k, v in self.cfg["eval"]["shop_floor"].items() if k != "max_queries"},
            "shop_floor_share": self.shop_floor_share(),
            "query_crops": self.cfg["query_crops"],
            "local_features": {k: v for k, v in self.cfg["rerank"].items()
                               if k in ("enabled", "max_features", "max_side")},
            "encoding_batch_size": self.cfg["encoding_batch_size"],
            "parquet_column": self.cfg["parquet_column"],
        }

    def shop_floor_share(self) -> float:
        """Of the catalog's photos that get shop-floor queries (eval.shop_floor.max_queries). The main process
        counts the catalog (cached beside the lists); a job on a cluster node reads that count and nothing else,
        as it reads only its own list."""
        from mlprep.sku.shopfloor import sample_share

        limit = self.cfg["eval"]["shop_floor"].get("max_queries")
        if not limit or not self.cfg.get("enabled", True):
            return 1.0
        try:
            return sample_share(self.count_items() if self.main_process else recorded_count(self.lists_dir), limit)
        except OSError:  # no catalog file (yet): the manifest job says so, naming it
            return 1.0

    def build_settings(self) -> dict:
        """The settings that change the merged index and checks: a change reruns the merge only."""
        return {k: self.cfg[k] for k in ("index", "duplicate_images", "confusable_pairs", "confusable_sample",
                                         "rerank", "query_crops")}

    def query_photo_paths(self, wildcards=None) -> list[str]:
        """The photos `eval.queries` names (inputs of rule sku_query_photos, so that a changed photo reruns it); a
        truth table that cannot be used stops the workflow before any job starts, naming the file."""
        from pathlib import Path

        from mlprep.sku.queries import read_truth

        queries = self.cfg["eval"]["queries"]
        return [str(Path(queries["images_dir"]) / image) for image in read_truth(queries["truth"])["image"]]
