"""What the Snakemake DAG needs to know about video_frames: splits, shard lists, their fingerprints.

As in sku_index, a shard job reads its clips from its list file and declares the list's fingerprint
as a param, so adding pairs reruns only the shards the new clips land in (mlprep.shardlists).
"""

from __future__ import annotations

import hashlib
import json

from mlprep.sharding import shard_names
from mlprep.shardlists import ShardLists, file_digest
from mlprep.video.pairs import LIST_COLUMNS, sync_lists


class VideoWorkflow:
    def __init__(self, config: dict, results: str = "results", main_process: bool = True):
        self.config = config
        self.cfg = config["video_frames"]
        self.dir = f"{results}/video_frames"
        self.main_process = main_process
        self.splits = ["train"] if self.cfg["split_mode"] == "all_train" else ["train", "val"]
        self.shard_counts = {split: int(self.cfg["shards"][split]) for split in self.splits}
        names = [f"{split}/{shard}" for split in self.splits for shard in shard_names(self.shard_counts[split])]
        self.lists = ShardLists(f"{self.dir}/lists", names, LIST_COLUMNS)
        self._fingerprints: dict[str, str] | None = None

    def fingerprints(self) -> dict[str, str]:
        """'train/000-of-002' -> digest of its list, after bringing the lists in step (once per run)."""
        if self._fingerprints is None:
            self._fingerprints = sync_lists(self.cfg, self.config["seed"], self.shard_counts, self.lists)
        return self._fingerprints

    def shard_list(self, wildcards) -> str:
        return str(self.lists.path(f"{wildcards.split}/{wildcards.shard}"))

    def shard_fingerprint(self, wildcards) -> str:
        name = f"{wildcards.split}/{wildcards.shard}"
        if not self.main_process:  # a job on a node: its own list, never the catalog
            return file_digest(self.lists.path(name))
        return self.fingerprints()[name]

    def catalog_fingerprint(self, wildcards) -> str:
        text = json.dumps(self.fingerprints(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def frame_settings(self, wildcards) -> dict:
        """Settings that change the frames; the decoder backend does not (all give the same frames)."""
        return {k: self.cfg[k] for k in ("num_frames", "width", "height")}

    def shard_prefixes(self) -> list[tuple[str, str]]:
        return [(name.split("/")[0], f"{self.dir}/{name}") for name in self.lists.names]

    def shard_files(self, suffix: str) -> list[str]:
        return [f"{prefix}{suffix}" for _, prefix in self.shard_prefixes()]
