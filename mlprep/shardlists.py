"""Per-shard item lists: the one sharding helper every pipeline uses.

A shard job's only input is one small list file (JSON lines, one array per item: what the job needs
plus each file's size and mtime), rewritten only when that shard's content changes. So the DAG's cost
grows with the number of shards, not items; adding items reruns only the shards they land in; editing
a file changes its line and reruns its shard; and a job on a cluster node reads its own list, never
the whole catalog.

The lists are refreshed when the workflow's DAG is built, in the main Snakemake process only (a
dry-run refreshes them too: they are a cache of the catalog, and refreshing an unchanged catalog
writes nothing). `fingerprints.json` beside them records a digest per shard and changes exactly
when some list does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.io import write_json

SUFFIX = ".jsonl"
FINGERPRINTS = "fingerprints.json"
_NEEDS_ESCAPE = r'["\\\x00-\x1f\x7f]'


def json_strings(values: Sequence) -> list[str]:
    """JSON string literals for many values at once: json.dumps only where escaping is needed."""
    series = pd.Series(values, dtype=object).fillna("").astype(str)
    texts = series.tolist()
    escape = series.str.contains(_NEEDS_ESCAPE, regex=True).to_numpy()
    out = ['"' + t + '"' for t in texts]
    for i in np.flatnonzero(escape):
        out[i] = json.dumps(texts[i], ensure_ascii=False)
    return out


def json_numbers(values: Sequence) -> list[str]:
    """JSON number literals (null for NaN/None)."""
    series = pd.Series(values, dtype=object)
    return ["null" if v is None or (isinstance(v, float) and v != v) else json.dumps(v) for v in series.tolist()]


def encode_lines(columns: dict[str, tuple[str, Sequence]]) -> list[str]:
    """One JSON array per row from columns given as name -> ("str" | "int" | "num", values)."""
    encoded = []
    for kind, values in columns.values():
        if kind == "str":
            encoded.append(json_strings(values))
        elif kind == "int":
            encoded.append([str(int(v)) for v in np.asarray(values, dtype=np.int64).tolist()])
        else:
            encoded.append(json_numbers(values))
    return ["[" + ",".join(parts) + "]" for parts in zip(*encoded)]


def file_digest(path: Path | str) -> str:
    """The digest a list's fingerprint is: what a job on a cluster node computes from its own list."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


class ShardLists:
    """The list files of one pipeline: one per shard name ('003-of-016', or 'train/003-of-016')."""

    def __init__(self, folder: Path | str, names: Sequence[str], columns: Sequence[str]):
        self.folder = Path(folder)
        self.names = list(names)
        self.columns = list(columns)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    @property
    def fingerprints_path(self) -> Path:
        return self.folder / FINGERPRINTS

    def fingerprints(self) -> dict[str, str]:
        """Shard name -> digest of its list, as last written ({} when the lists are not in step)."""
        try:
            data = json.loads(self.fingerprints_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("columns") != self.columns:
            return {}
        shards = data.get("shards") or {}
        return shards if set(shards) == set(self.names) else {}

    def complete(self) -> bool:
        return bool(self.fingerprints()) and all(self.path(n).exists() for n in self.names)

    def sync(self, list_index: np.ndarray, lines: list[str]) -> list[str]:
        """Write the lists whose lines changed (`list_index`: the position in `names` of each line's list);
        return the names of the lists written."""
        order = np.argsort(list_index, kind="stable")
        bounds = np.searchsorted(np.asarray(list_index)[order], np.arange(len(self.names) + 1))
        ordered = [lines[i] for i in order]
        old = self.fingerprints()
        new, changed = {}, []
        for k, name in enumerate(self.names):
            chunk = ordered[bounds[k] : bounds[k + 1]]
            data = ("\n".join(chunk) + "\n" if chunk else "").encode("utf-8")
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            new[name] = digest
            path = self.path(name)
            if old.get(name) != digest or not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                changed.append(name)
        if changed or old != new:
            self._remove_stale()
            write_json({"columns": self.columns, "shards": new}, self.fingerprints_path)
        return changed

    def _remove_stale(self) -> None:
        """List files of another shard count (an earlier `shards:`), which no job reads any more."""
        keep = {self.path(n) for n in self.names}
        for path in self.folder.rglob(f"*{SUFFIX}"):
            if path not in keep:
                path.unlink()

    @staticmethod
    def read(path: Path | str, columns: Sequence[str]) -> list[dict]:
        """The items of one list, as dicts of `columns`."""
        with open(path, encoding="utf-8") as handle:
            return [dict(zip(columns, json.loads(line))) for line in handle if line.strip()]


def source_key(path: Path | str) -> list:
    """Identity of an input file for the catalog cache: absolute path, size, mtime."""
    path = Path(path).resolve()
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


class CatalogCache:
    """The parsed catalog of the last run, reused while its source file and settings are unchanged.

    Parsing a million-record JSON and deriving ids, paths and shards costs seconds; a rerun then pays
    only for the file stats. `key` holds everything the parse depends on.
    """

    VERSION = 1

    def __init__(self, folder: Path | str, key: dict):
        self.folder = Path(folder)
        self.key = {"version": self.VERSION, **key}

    def _path(self, name: str) -> Path:
        return self.folder / f"catalog.{name}"

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame] | None:
        try:
            if json.loads(self._path("key.json").read_text()) != json.loads(json.dumps(self.key)):
                return None
            return pd.read_parquet(self._path("parquet")), pd.read_parquet(self._path("failures.parquet"))
        except (OSError, ValueError):
            return None

    def save(self, candidates: pd.DataFrame, failures: pd.DataFrame) -> None:
        from mlprep.io import write_parquet

        self._path("key.json").unlink(missing_ok=True)  # never a key beside another run's tables
        write_parquet(candidates, self._path("parquet"))
        write_parquet(failures, self._path("failures.parquet"))
        self._path("stats.npy").unlink(missing_ok=True)
        write_json(self.key, self._path("key.json"))

    def same_stats(self, stats: np.ndarray) -> bool:
        try:
            return np.array_equal(np.load(self._path("stats.npy"), allow_pickle=False), stats)
        except (OSError, ValueError):
            return False

    def save_stats(self, stats: np.ndarray) -> None:
        from mlprep.io import save_npy

        save_npy(stats, self._path("stats.npy"))
