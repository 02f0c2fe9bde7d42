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
import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.io import remove_stale, write_json

SUFFIX = ".jsonl"
FINGERPRINTS = "fingerprints.json"
_NEEDS_ESCAPE = r'["\\\x00-\x1f\x7f]'


def json_strings(values: Sequence) -> list[str]:
    """JSON string literals for many values at once: json.dumps only where escaping is needed."""
    texts = pd.Series(values, dtype=object).fillna("").astype(str).tolist()
    out = ['"' + t + '"' for t in texts]
    if re.search(_NEEDS_ESCAPE, "".join(texts)):  # one scan of the whole column; rare in ids and paths
        for i, text in enumerate(texts):
            if re.search(_NEEDS_ESCAPE, text):
                out[i] = json.dumps(text, ensure_ascii=False)
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


def list_path(folder: Path | str, name: str) -> Path:
    """Where the list of shard `name` lives (a job on a node knows no more than its folder and name)."""
    return Path(folder) / f"{name}{SUFFIX}"


def cached_count(folder: Path | str, source: Path | str, count) -> int:
    """count(source), remembered in `folder` while the source file is unchanged: the size of a catalog,
    which items_per_shard turns into a shard count when the workflow is parsed."""
    path = Path(folder) / "count.json"
    key = source_key(source)
    try:
        data = json.loads(path.read_text())
        if data["source"] == key:
            return int(data["count"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    n = int(count(source))
    write_json({"source": key, "count": n}, path)
    return n


def recorded_count(folder: Path | str) -> int:
    """The count cached_count last remembered in `folder`, without looking at the source (what a job on a cluster
    node uses: the main process counted the catalog it was planned from); OSError when there is none."""
    try:
        return int(json.loads((Path(folder) / "count.json").read_text())["count"])
    except (ValueError, KeyError, TypeError) as err:
        raise OSError(f"{folder}/count.json: no catalog count recorded") from err


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
        return list_path(self.folder, name)

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
        return the names of the lists written. Lines are sorted within a list, so reordering the
        catalog file changes nothing."""
        order = np.argsort(list_index, kind="stable")
        bounds = np.searchsorted(np.asarray(list_index)[order], np.arange(len(self.names) + 1))
        ordered = [lines[i] for i in order]
        old = self.fingerprints()
        new, changed, cleaned = {}, [], set()
        for k, name in enumerate(self.names):
            chunk = sorted(ordered[bounds[k] : bounds[k + 1]])  # a list's text never depends on input order
            data = ("\n".join(chunk) + "\n" if chunk else "").encode("utf-8")
            digest = hashlib.blake2b(data, digest_size=16).hexdigest()
            new[name] = digest
            path = self.path(name)
            if old.get(name) != digest or not path.exists():
                if path.parent not in cleaned:  # one scan per folder: per list, 10,000 lists cost minutes
                    path.parent.mkdir(parents=True, exist_ok=True)
                    remove_stale(path.parent, f".*{SUFFIX}.tmp*")
                    cleaned.add(path.parent)
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

    def save(self, candidates: pd.DataFrame, failures: pd.DataFrame, table: str) -> None:
        from mlprep.io import write_parquet

        self._path("key.json").unlink(missing_ok=True)  # never a key beside another run's tables
        write_parquet(candidates, self._path("parquet"), table)
        write_parquet(failures, self._path("failures.parquet"), "failures")
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


# ---------------------------------------------------------------- refreshing the lists beside the DAG build

SYNCS = {  # pipeline -> "module:function(**payload) -> None" that brings its lists in step
    "sku_index": "mlprep.sku.catalog:sync_lists_from",
    "video_frames": "mlprep.video.pairs:sync_lists_from",
    "speaker_embed": "mlprep.speaker.corpus:sync_lists_from",
    "kline_factor": "mlprep.kline.catalog:sync_lists_from",
    "probe_qa": "mlprep.probe.catalog:sync_lists_from",
}


class ListSync:
    """Refreshes one pipeline's shard lists in a separate process, started as soon as the DAG needs the
    pipeline, so that reading and stat'ing a large catalog overlaps with Snakemake building the DAG on
    another core. `fingerprints()` waits for it; without a start() it refreshes in-process."""

    def __init__(self, pipeline: str, lists: ShardLists, payload: dict):
        self.pipeline = pipeline
        self.lists = lists
        self.payload = payload
        self._proc: subprocess.Popen | None = None
        self._fingerprints: dict[str, str] | None = None

    def start(self) -> None:
        if self._proc is None and self._fingerprints is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mlprep.shardlists", self.pipeline],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            self._proc.stdin.write(json.dumps(self.payload))  # ten thousand shard names: not an argument
            self._proc.stdin.close()

    def fingerprints(self) -> dict[str, str]:
        if self._fingerprints is None:
            if self._proc is None:
                run_sync(self.pipeline, self.payload)
            else:
                errors = self._proc.stderr.read()
                self._proc.wait()
                if self._proc.returncode != 0:
                    raise RuntimeError(f"{self.pipeline}: refreshing the shard lists failed:\n{errors[-3000:]}")
            self._fingerprints = self.lists.fingerprints()
            if not self._fingerprints:
                raise RuntimeError(f"{self.pipeline}: no shard lists in {self.lists.folder} after refreshing them")
        return self._fingerprints


def run_sync(pipeline: str, payload: dict) -> None:
    module, function = SYNCS[pipeline].split(":")
    getattr(importlib.import_module(module), function)(**payload)


if __name__ == "__main__":
    from mlprep.failures import InputError

    try:
        run_sync(sys.argv[1], json.loads(sys.stdin.read()))
    except InputError as err:  # the data against the config: its message alone, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
