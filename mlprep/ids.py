"""Stable ids: sharding by hash, file names from untrusted ids, paths kept inside their root."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

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
    """Join `relative` (a path from an input file) onto `root`; refuse anything that leaves `root`.

    The check is on the path as written, after collapsing '.' and '..' (absolute paths, NUL bytes
    and paths that climb above `root` are refused). Symlinks the user placed inside `root` are
    followed when the file is read, as the user meant: a data folder of links to another disk is
    common, and a link is the folder owner's choice, not something an input file can forge.
    """
    root_path = Path(root).resolve()
    if not relative or Path(relative).is_absolute():
        raise UnsafePathError(f"path {relative!r} must be relative to {root_path}")
    if "\x00" in relative:
        raise UnsafePathError(f"path {relative!r} holds a NUL byte")
    normal = posixpath.normpath(relative)
    if normal == ".." or normal.startswith("../"):
        raise UnsafePathError(f"path {relative!r} escapes {root_path}")
    return root_path / normal


def shards_of(ids: Sequence[str], n_shards: int) -> np.ndarray:
    """shard_of for many ids at once (int64 array), the same values."""
    if n_shards < 1:
        raise ValueError(f"shard count must be >= 1, got {n_shards}")
    blake = hashlib.blake2b
    return np.fromiter(
        (int.from_bytes(blake(i.encode("utf-8"), digest_size=8).digest(), "big") % n_shards for i in ids),
        dtype=np.int64, count=len(ids),
    )


def unsafe_path_reasons(relatives: Sequence[str], root: Path | str) -> list[tuple[int, str]]:
    """(position, reason) for each path resolve_inside would refuse, found with vectorised string tests.

    `relatives` are normalised already (posixpath.normpath), as the catalogs store them."""
    if not len(relatives):
        return []
    s = pd.Series(relatives, dtype=object)
    flagged = (s == "") | s.str.startswith("/") | s.str.contains("\x00", regex=False) | (s == "..") \
        | s.str.startswith("../")
    out = []
    for position in np.flatnonzero(flagged.to_numpy()):
        try:
            resolve_inside(root, relatives[position])
        except UnsafePathError as err:
            out.append((int(position), str(err)))
    return out
