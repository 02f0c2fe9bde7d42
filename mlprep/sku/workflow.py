"""What the Snakemake DAG needs to know about sku_index: shard lists, their fingerprints, rerun settings.

A shard job reads its items from its list file (mlprep.shardlists) and declares the list's
fingerprint as a param: adding SKUs changes the lists, so the params, of only the shards they land
in, and Snakemake reruns only those (plus the merge), as a dry-run shows. The lists are refreshed
once per Snakemake run, in the main process, when a job first asks for a fingerprint (after the DAG's
shape is known); a job on a cluster node only hashes its own list.
"""

from __future__ import annotations

import hashlib
import json

from functools import cached_property

from mlprep.sharding import shard_count, shard_names
from mlprep.shardlists import ListSync, ShardLists, cached_count, file_digest, list_path
from mlprep.sku.catalog import LIST_COLUMNS, count_images


class SkuWorkflow:
    """The shard count, names and lists are worked out on first use, in the main process only: a job on
    a cluster node knows its shard from its wildcard and never reads the catalog."""

    def __init__(self, config: dict, results: str = "results", main_process: bool = True):
        self.config = config
        self.cfg = config["sku_index"]
        self.dir = f"{results}/sku_index"
        self.lists_dir = f"{self.dir}/lists"
        self.main_process = main_process

    @cached_property
    def shard_total(self) -> int:
        """`shards`, or with `items_per_shard` the power of two that keeps shards at most that big."""
        if not self.cfg.get("items_per_shard"):
            return int(self.cfg["shards"])
        n = cached_count(self.lists_dir, self.cfg["sku_data"], count_images)
        return shard_count(n, int(self.cfg["items_per_shard"]))

    @cached_property
    def shards(self) -> list[str]:
        return shard_names(self.shard_total)

    @cached_property
    def lists(self) -> ShardLists:
        return ShardLists(self.lists_dir, self.shards, LIST_COLUMNS)

    @cached_property
    def sync(self) -> ListSync:
        return ListSync("sku_index", self.lists, {
            "sku_data": self.cfg["sku_data"], "images_dir": self.cfg["images_dir"],
            "folder": self.lists_dir, "shards": self.shards,
        })

    def shard_count_param(self, wildcards) -> int:
        return self.shard_total

    def fingerprints(self) -> dict[str, str]:
        """Shard -> digest of its list, after bringing the lists in step with the catalog (once per run)."""
        return self.sync.fingerprints()

    @property
    def shard_list_pattern(self) -> str:
        """The list a shard job reads, with {shard} for Snakemake to fill."""
        return str(list_path(self.lists_dir, "{shard}"))

    def shard_fingerprint(self, wildcards) -> str:
        if not self.main_process:  # a job on a node: its own list, never the catalog
            return file_digest(list_path(self.lists_dir, wildcards.shard))
        return self.fingerprints()[wildcards.shard]

    def catalog_fingerprint(self, wildcards) -> str:
        """One digest of all lists: the manifest reruns when any image is added, removed or edited."""
        text = json.dumps(self.fingerprints(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def encode_settings(self) -> dict:
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

    def build_settings(self) -> dict:
        """The settings that change the merged index and checks: a change reruns the merge only."""
        return {k: self.cfg[k] for k in ("index", "duplicate_images", "confusable_pairs", "confusable_sample")}

    def shard_dirs(self, wildcards=None) -> list[str]:
        """The merge's inputs. Asked for early in the DAG build: the lists start refreshing beside it."""
        if self.main_process:
            self.sync.start()
        return [f"{self.dir}/shards/{shard}" for shard in self.shards]
