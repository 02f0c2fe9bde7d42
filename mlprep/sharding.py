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
