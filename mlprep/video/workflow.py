"""What the Snakemake DAG needs to know about video_frames: splits, shard lists, their fingerprints.

As in sku_index, a shard job reads its clips from its list file and declares the list's fingerprint
as a param, so adding pairs reruns only the shards the new clips land in (mlprep.shardlists). Shard
counts, names and lists are worked out on first use, in the main process only.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

from mlprep.sharding import shard_count, shard_names
from mlprep.shardlists import ListSync, ShardLists, cached_count, file_digest, list_path
from mlprep.video.pairs import LIST_COLUMNS, count_clips, count_pairs


class VideoWorkflow:
    def __init__(self, config: dict, results: str = "results", main_process: bool = True):
        self.config = config
        self.cfg = config["video_frames"]
        self.dir = f"{results}/video_frames"
        self.lists_dir = f"{self.dir}/lists"
        self.main_process = main_process
        self.splits = ["train"] if self.cfg["split_mode"] == "all_train" else ["train", "val"]

    @cached_property
    def shard_counts(self) -> dict[str, int]:
        """Shards per split: `shards`, or with `items_per_shard` the power of two that keeps each split's
        shards at most that big (its share of the pairs estimated from val_ratio)."""
        per_shard = self.cfg.get("items_per_shard")
        if not per_shard:
            return {split: int(self.cfg["shards"][split]) for split in self.splits}
        if self.cfg.get("pairs"):
            n = cached_count(self.lists_dir, self.cfg["pairs"], count_pairs)
        else:  # the containers' own samples: their index, cached per container
            n = count_clips(self.cfg, self.lists_dir, self.config.get("object_storage"))
        share = {"train": 1.0 - self.cfg["val_ratio"], "val": self.cfg["val_ratio"]} if len(self.splits) > 1 \
            else {"train": 1.0}
        return {split: shard_count(round(n * share[split]), int(per_shard)) for split in self.splits}

    def shard_counts_param(self, wildcards) -> dict[str, int]:
        return self.shard_counts

    @cached_property
    def lists(self) -> ShardLists:
        names = [f"{split}/{shard}" for split in self.splits for shard in shard_names(self.shard_counts[split])]
        return ShardLists(self.lists_dir, names, LIST_COLUMNS)

    @cached_property
    def sync(self) -> ListSync:
        return ListSync("video_frames", self.lists, {
            "cfg": self.cfg, "seed": self.config["seed"], "shards": self.shard_counts,
            "folder": self.lists_dir, "names": self.lists.names, "storage": self.config.get("object_storage"),
        })

    def fingerprints(self) -> dict[str, str]:
        """'train/000-of-002' -> digest of its list, after bringing the lists in step (once per run)."""
        return self.sync.fingerprints()

    @property
    def shard_list_pattern(self) -> str:
        """The list a shard job reads, with {split} and {shard} for Snakemake to fill."""
        return str(list_path(self.lists_dir, "{split}/{shard}"))

    def shard_fingerprint(self, wildcards) -> str:
        name = f"{wildcards.split}/{wildcards.shard}"
        if not self.main_process:  # a job on a node: its own list, never the catalog
            return file_digest(list_path(self.lists_dir, name))
        return self.fingerprints()[name]

    def catalog_fingerprint(self, wildcards) -> str:
        text = json.dumps(self.fingerprints(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def frame_settings(self) -> dict:
        """Settings that change the frames; the decoder backend does not (all give the same frames)."""
        return {k: self.cfg[k] for k in ("num_frames", "width", "height", "webdataset")}

    @property
    def webdataset_output(self) -> dict:
        """The shard job's webdataset tar beside its pkl, where `webdataset` asks for one."""
        if self.cfg["webdataset"] == "none":
            return {}
        return {"tar": f"{self.dir}/{{split}}/{{shard}}.tar"}

    def tar_files(self, wildcards=None) -> list[str]:
        """The gather's inputs: every shard's tar (none without `webdataset`), so that a lost one is made again."""
        return self.shard_files(".tar")(wildcards) if self.webdataset_output else []

    def shard_prefixes(self, wildcards=None) -> list[tuple[str, str]]:
        return [(name.split("/")[0], f"{self.dir}/{name}") for name in self.lists.names]

    def shard_files(self, suffix: str):
        """An input function for the gather: the shard files with `suffix`. Asked for early in the DAG
        build: the lists start refreshing beside it."""

        def files(wildcards=None) -> list[str]:
            if self.main_process:
                self.sync.start()
            return [f"{prefix}{suffix}" for _, prefix in self.shard_prefixes()]

        return files
