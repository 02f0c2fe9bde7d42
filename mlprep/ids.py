"""Stable ids: sharding by hash, file names from untrusted ids, paths kept inside their root."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
    digests = b"".join([blake(i.encode("utf-8"), digest_size=8).digest() for i in ids])
    return (np.frombuffer(digests, dtype=">u8") % np.uint64(n_shards)).astype(np.int64)


_IRREGULAR = ("./", "/.", "//", "\x00", "\n/", "/\n", "\n\n", "\n.")


def normalise_paths(paths: list[str]) -> list[str]:
    """posixpath.normpath of each relative path, skipped in one scan when none needs it (the usual case)."""
    joined = "\n".join(paths)
    if not any(mark in joined for mark in _IRREGULAR) and not (paths and (paths[0][:1] in ("", "/", ".")
                                                                          or paths[-1][-1:] in ("/", "."))):
        return paths
    return [posixpath.normpath(p) if p else p for p in paths]


def unsafe_path_reasons(relatives: Sequence[str], root: Path | str) -> list[tuple[int, str]]:
    """(position, reason) for each path resolve_inside would refuse, found with one scan of all of them.

    `relatives` are normalised already (normalise_paths), as the catalogs store them."""
    if not len(relatives):
        return []
    joined = "\n".join(relatives)
    if (not any(mark in joined for mark in ("\n/", "\x00", "\n..", "\n\n")) and relatives[0][:1] not in ("", "/", ".")
            and "" not in relatives):
        return []
    out = []
    for position, relative in enumerate(relatives):
        if not relative or relative.startswith(("/", "..")) or "\x00" in relative:
            try:
                resolve_inside(root, relative)
            except UnsafePathError as err:
                out.append((position, str(err)))
    return out
