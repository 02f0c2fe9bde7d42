"""File facts for many files at once: size, modification time and whether each is a regular file.

A catalog of a million images is stat'ed on every run (that is how an edited image reruns its
shard), so this is a hot path: one stat per file, no Python objects kept per file, and the list
split over worker processes (a stat is kernel work, which threads serialise on the GIL here).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
from collections.abc import Sequence

import numpy as np

PARALLEL_FROM = 100_000  # below this, forking workers costs more than it saves


def _stats(paths: Sequence[str]) -> np.ndarray:
    """int64 [n, 2]: size and mtime_ns; size -1 for a path that is missing or not a regular file."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    os_stat, is_reg = os.stat, stat.S_ISREG
    for i, path in enumerate(paths):
        try:
            st = os_stat(path)
        except (OSError, ValueError):
            continue
        if is_reg(st.st_mode):
            out[i, 0] = st.st_size
            out[i, 1] = st.st_mtime_ns
    return out


_CHUNKS: list[Sequence[str]] = []


def _stats_of_chunk(index: int) -> np.ndarray:
    return _stats(_CHUNKS[index])


def file_stats(paths: Sequence[str], workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) int64 arrays; size is -1 where the path is missing or not a regular file."""
    workers = workers or os.cpu_count() or 1
    if workers < 2 or len(paths) < PARALLEL_FROM:
        result = _stats(paths)
    else:
        global _CHUNKS
        step = -(-len(paths) // workers)
        _CHUNKS = [paths[i : i + step] for i in range(0, len(paths), step)]
        try:  # forked workers see the chunks without pickling a million strings
            with mp.get_context("fork").Pool(len(_CHUNKS)) as pool:
                result = np.concatenate(pool.map(_stats_of_chunk, range(len(_CHUNKS))))
        finally:
            _CHUNKS = []
    return result[:, 0], result[:, 1]
