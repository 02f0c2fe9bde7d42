"""Shard wildcards: '003-of-016' names shard 3 of 16 (sortable, and a new shard count gets new files)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardId:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardId:
        index, sep, count = str(text).partition("-of-")
        if not sep or not index.isdigit() or not count.isdigit() or int(index) >= int(count):
            raise ValueError(f"bad shard name {text!r}, expected e.g. 003-of-016")
        return cls(int(index), int(count))

    def __str__(self) -> str:
        width = max(3, len(str(self.count)))
        return f"{self.index:0{width}d}-of-{self.count:0{width}d}"


def shard_names(count: int) -> list[str]:
    return [str(ShardId(i, count)) for i in range(count)]


def shard_count(n_items: int, items_per_shard: int) -> int:
    """Shards for `n_items` at most `items_per_shard` each: the smallest power of two that holds them.

    A power of two, so that the count (and with it every item's shard, which a new count reshuffles)
    changes only when the catalog doubles, not with every item added."""
    if items_per_shard < 1:
        raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
    needed = max(1, -(-n_items // items_per_shard))
    return 1 << (needed - 1).bit_length()
