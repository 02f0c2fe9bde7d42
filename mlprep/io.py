"""Atomic output writing: a final output name either holds a whole file or does not exist."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def remove_stale(folder: Path, pattern: str) -> None:
    """Delete what an earlier, killed writer of the same output left (its temporary file or folder): only
    one job writes an output at a time, so any such leftover is stale."""
    for path in folder.glob(pattern):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    The temporary name keeps the suffix (some writers care) and is hidden, so a crash leaves at
    most a dot-file that no rule ever reads, never a partial file under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{glob.escape(final.stem)}.tmp*{glob.escape(final.suffix)}")
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it becomes `final` (replacing an empty or absent one)
    only if the block succeeds: a shard folder holds all its files or does not exist."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{glob.escape(final.name)}.tmp*")
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists() and not any(final.iterdir()):
            final.rmdir()
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(frame: pd.DataFrame, path: Path | str, table: str, metadata: dict | None = None) -> None:
    """`frame` as declared table `table` (mlprep.tables: its columns, its types, its name in the file), atomically.
    `metadata` (JSON-able) goes into the file's key-value metadata under 'mlprep'."""
    from mlprep.tables import to_arrow

    write_table(to_arrow(frame, table), path, table, metadata)


def write_table(arrow, path: Path | str, table: str, metadata: dict | None = None) -> None:
    """An Arrow table of declared table `table`, atomically, with its name (and `metadata`) in the file."""
    import pyarrow.parquet as pq

    from mlprep.tables import named

    extra = {b"mlprep": json.dumps(metadata, sort_keys=True, default=str).encode()} if metadata is not None else {}
    with atomic_path(path) as tmp:
        pq.write_table(named(arrow, table, extra), tmp)


def read_parquet_metadata(path: Path | str) -> dict:
    """What write_parquet stored under 'mlprep' ({} when nothing)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"mlprep")
    return json.loads(raw) if raw else {}


def save_npy(array: np.ndarray, path: Path | str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def load_npy(path: Path | str) -> np.ndarray:
    """Read an array without ever unpickling (inputs may come from anyone)."""
    return np.load(path, allow_pickle=False)


def write_json(obj: Any, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())
