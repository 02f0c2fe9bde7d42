"""Stable ids: sharding by hash, file names from untrusted ids, paths kept inside their root."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafePathError(ValueError):
    """A path from an input file points outside the folder it must stay in."""


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same on every machine and Python run (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(item_id: str, n_shards: int) -> int:
    """The shard an item belongs to: depends only on its id and the shard count, never on list order."""
    if n_shards < 1:
        raise ValueError(f"shard count must be >= 1, got {n_shards}")
    return stable_hash(item_id) % n_shards


def safe_filename(raw: str, max_len: int = 96) -> str:
    """A file name made from an untrusted id: no separators, no '..', no leading dot, bounded length.

    When the id had to change, a short hash of the original is appended so that two different ids
    never map to the same file name.
    """
    cleaned = _UNSAFE.sub("_", raw).strip("._-")
    if cleaned == raw and 0 < len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.blake2b(raw.encode("utf-8"), digest_size=6).hexdigest()
    stem = cleaned[: max(1, max_len - len(digest) - 1)] or "id"
    return f"{stem}-{digest}"


def resolve_inside(root: Path | str, relative: str) -> Path:
    """Join `relative` onto `root` and refuse anything that lands outside `root`."""
    root_path = Path(root).resolve()
    if not relative or Path(relative).is_absolute():
        raise UnsafePathError(f"path {relative!r} must be relative to {root_path}")
    candidate = (root_path / relative).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise UnsafePathError(f"path {relative!r} escapes {root_path}")
    return candidate
