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

from mlprep.sharding import shard_names
from mlprep.shardlists import ShardLists, file_digest
from mlprep.sku.catalog import LIST_COLUMNS, sync_lists


class SkuWorkflow:
    def __init__(self, config: dict, results: str = "results", main_process: bool = True):
        self.config = config
        self.cfg = config["sku_index"]
        self.dir = f"{results}/sku_index"
        self.main_process = main_process
        self.shards = shard_names(self.cfg["shards"])
        self.lists = ShardLists(f"{self.dir}/lists", self.shards, LIST_COLUMNS)
        self._fingerprints: dict[str, str] | None = None

    def fingerprints(self) -> dict[str, str]:
        """Shard -> digest of its list, after bringing the lists in step with the catalog (once per run)."""
        if self._fingerprints is None:
            self._fingerprints = sync_lists(self.cfg["sku_data"], self.cfg["images_dir"], self.lists)
        return self._fingerprints

    def shard_list(self, wildcards) -> str:
        return str(self.lists.path(wildcards.shard))

    def shard_fingerprint(self, wildcards) -> str:
        if not self.main_process:  # a job on a node: its own list, never the catalog
            return file_digest(self.lists.path(wildcards.shard))
        return self.fingerprints()[wildcards.shard]

    def catalog_fingerprint(self, wildcards) -> str:
        """One digest of all lists: the manifest reruns when any image is added, removed or edited."""
        text = json.dumps(self.fingerprints(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

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

    def shard_dirs(self) -> list[str]:
        return [f"{self.dir}/shards/{shard}" for shard in self.shards]
