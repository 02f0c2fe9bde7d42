"""What the Snakemake DAG needs to know about video_frames: splits, shard lists, rerun settings.

As in sku_index, a shard job's inputs are its clip files and its params its item list, so adding
pairs reruns only the shards the new clips land in.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cached_property

from mlprep.sharding import ShardId, shard_names
from mlprep.video.pairs import ClipItem, PairCatalog, read_pairs


class VideoWorkflow:
    def __init__(self, config: dict, results: str = "results"):
        self.config = config
        self.cfg = config["video_frames"]
        self.dir = f"{results}/video_frames"
        self.splits = ["train"] if self.cfg["split_mode"] == "all_train" else ["train", "val"]
        self.shard_counts = {split: int(self.cfg["shards"][split]) for split in self.splits}

    @cached_property
    def catalog(self) -> PairCatalog:
        cfg = self.cfg
        return read_pairs(cfg["pairs"], cfg["clips_dir"], self.shard_counts, cfg["split_mode"], cfg["val_ratio"],
                          self.config["seed"], cfg["clip_ext"])

    def _items(self, wildcards) -> list[ClipItem]:
        return self.catalog.shard_items(wildcards.split, ShardId.parse(wildcards.shard).index)

    def shard_clips(self, wildcards) -> list[str]:
        return [item.path for item in self._items(wildcards)]

    def shard_items(self, wildcards) -> list[dict]:
        return [asdict(item) for item in self._items(wildcards)]

    def frame_settings(self, wildcards) -> dict:
        """Settings that change the frames; the decoder backend does not (all give the same frames)."""
        return {k: self.cfg[k] for k in ("num_frames", "width", "height")}

    def shard_prefixes(self) -> list[tuple[str, str]]:
        return [(split, f"{self.dir}/{split}/{shard}") for split in self.splits
                for shard in shard_names(self.shard_counts[split])]

    def shard_files(self, suffix: str) -> list[str]:
        return [f"{prefix}{suffix}" for _, prefix in self.shard_prefixes()]
