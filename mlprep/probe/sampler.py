"""The failure-key sampler: `per_key` failures of every failure key, seeded, streamed, in bounded memory.

A failure's key is its label pair (`label -> prediction`), its verified factor, or both (`key_by`). Every
failure gets a priority, a 64-bit hash of (seed, source file, row) computed with array operations; a key's
sample is its `per_key` failures of smallest priority. That is a uniform sample without replacement per key
(a key with fewer failures gives all of them), the same whatever the order of the rows, the size of the
chunks or the number of files, and it needs only the kept candidates in memory: the rows are streamed one
row group at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

KEY_BY = ("labels", "factor", "both")
SAMPLE_COLUMNS = ["file", "row", "key", "priority"]


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 arrays: a fast, well-spread hash."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def file_salt(seed: int, file: str) -> np.uint64:
    digest = hashlib.blake2b(f"{seed}\x00{file}".encode(), digest_size=8).digest()
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)[0]


def priorities(seed: int, file: str, rows: np.ndarray) -> np.ndarray:
    """The sampling priority of rows `rows` of `file` (uint64)."""
    with np.errstate(over="ignore"):
        return _mix(np.asarray(rows, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ file_salt(seed, file))


def failure_keys(frame: pd.DataFrame, key_by: str) -> pd.Series:
    """The key of each failure row (columns label, prediction, factor)."""
    if key_by not in KEY_BY:
        raise ValueError(f"key_by must be one of {', '.join(KEY_BY)}, got {key_by!r}")
    labels = frame["label"].astype(str) + " -> " + frame["prediction"].astype(str)
    if key_by == "labels":
        return labels
    factor = frame["factor"].fillna("unverified").astype(str)
    return factor if key_by == "factor" else labels + " | " + factor


class KeySampler:
    """Feed it chunks of failures (file, row, label, prediction, factor); `result()` is the sample."""

    def __init__(self, per_key: int, seed: int, key_by: str = "labels"):
        self.per_key, self.seed, self.key_by = int(per_key), int(seed), key_by
        self.kept = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(SAMPLE_COLUMNS, [str, "int64", str, "uint64"])})
        self.seen: dict[str, int] = {}

    def add(self, chunk: pd.DataFrame) -> None:
        if not len(chunk):
            return
        keys = failure_keys(chunk, self.key_by)
        prio = np.empty(len(chunk), dtype=np.uint64)
        files = chunk["file"].to_numpy()
        rows = chunk["row"].to_numpy(np.int64)
        for file in pd.unique(files):  # one salt per file; rows hashed together
            mine = files == file
            prio[mine] = priorities(self.seed, str(file), rows[mine])
        counts = keys.value_counts()
        for key, n in counts.items():
            self.seen[key] = self.seen.get(key, 0) + int(n)
        new = pd.DataFrame({"file": files, "row": rows, "key": keys.to_numpy(), "priority": prio})
        both = pd.concat([self.kept, new], ignore_index=True)
        codes = pd.factorize(both["key"])[0]
        order = np.lexsort((both["priority"].to_numpy(), codes))
        ranked_codes = codes[order]
        starts = np.r_[0, np.flatnonzero(ranked_codes[1:] != ranked_codes[:-1]) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        self.kept = both.iloc[order[rank < self.per_key]].reset_index(drop=True)

    def feed(self, chunks: Iterable[pd.DataFrame]) -> KeySampler:
        for chunk in chunks:
            self.add(chunk)
        return self

    def result(self) -> pd.DataFrame:
        """The sample sorted by (key, priority), with each key's total failure count."""
        out = self.kept.sort_values(["key", "priority"], kind="stable").reset_index(drop=True)
        out["key_failures"] = out["key"].map(self.seen).astype("int64")
        return out
