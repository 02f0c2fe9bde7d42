"""What the Snakemake DAG needs from a pipeline whose items go to `{shard}` jobs (sku_index, speaker_embed, and
the pipelines after them): the shard count, names and lists, each shard's fingerprint, the gather's inputs.

A shard job reads its items from its list file (mlprep.shardlists) and declares the list's digest as a
param: a change to the catalog rewrites the lists, so the params, of only the shards it touches, and
Snakemake reruns only those (plus the gather), as a dry-run shows. Everything is worked out on first use,
in the main Snakemake process only: a job on a cluster node knows its shard from its wildcard, hashes
its own list, and never reads the catalog.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

from mlprep.sharding import shard_count, shard_names
from mlprep.shardlists import ListSync, ShardLists, file_digest, list_path


class ShardedPipeline:
    """Subclasses set `pipeline` and `columns`, and give `count_items()` and `sync_payload()`."""

    pipeline: str
    columns: list[str]

    def __init__(self, config: dict, results: str = "results", main_process: bool = True):
        self.config = config
        self.cfg = config[self.pipeline]
        self.dir = f"{results}/{self.pipeline}"
        self.lists_dir = f"{self.dir}/lists"
        self.main_process = main_process

    def count_items(self) -> int:
        """How many items the catalog lists (what items_per_shard turns into a shard count)."""
        raise NotImplementedError

    def sync_payload(self) -> dict:
        """The arguments of the pipeline's sync function (mlprep.shardlists.SYNCS), JSON-serialisable."""
        raise NotImplementedError

    @cached_property
    def shard_total(self) -> int:
        """`shards`, or with `items_per_shard` the power of two that keeps shards at most that big."""
        if not self.cfg.get("items_per_shard"):
            return int(self.cfg["shards"])
        return shard_count(self.count_items(), int(self.cfg["items_per_shard"]))

    def shard_count_param(self, wildcards) -> int:
        return self.shard_total

    @cached_property
    def shards(self) -> list[str]:
        return shard_names(self.shard_total)

    @cached_property
    def lists(self) -> ShardLists:
        return ShardLists(self.lists_dir, self.shards, self.columns)

    @cached_property
    def sync(self) -> ListSync:
        return ListSync(self.pipeline, self.lists, {**self.sync_payload(), "folder": self.lists_dir,
                                                    "shards": self.shards})

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
        """One digest of all lists: the manifest reruns when any item is added, removed or edited."""
        text = json.dumps(self.fingerprints(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def shard_dirs(self, wildcards=None) -> list[str]:
        """The gather's inputs. Asked for early in the DAG build: the lists start refreshing beside it."""
        if self.main_process:
            self.sync.start()
        return [f"{self.dir}/shards/{shard}" for shard in self.shards]
