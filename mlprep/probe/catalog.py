"""Listing a parquet image dataset for the probe shards: row groups from the files' footers, and the label set.

A probe shard's items are row groups (`<file>#<group>`, hashed to a shard): a new file, or a file rewritten,
changes the lists of the shards its row groups land in, and only those rerun. Footers (and, when the config
gives no `labels`, each file's label column) are read once per file version: `scan.json` in the lists folder
keeps them by (size, mtime), so rebuilding the DAG over hundreds of unchanged files reads nothing.

The label set is the config's `labels`, or else every distinct value of the label column, sorted; it is
written to `labels.json` beside the lists (rewritten only when it changes) and is part of every probe shard's
fingerprint: a zero-shot probe compares each image with every label, so a new label reruns every shard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlprep.failures import Failure
from mlprep.ids import shards_of
from mlprep.io import write_json
from mlprep.probe.reader import AUTO, row_group_frame
from mlprep.sources import IMAGE_COLUMNS, dataset_files, join, open_parquet, row_counts
from mlprep.shardlists import ShardLists, encode_lines, file_digest

log = logging.getLogger(__name__)

LIST_COLUMNS = ["item_id", "file", "row_group", "first_row", "rows", "size", "stamp"]
LABELS_FILE = "labels.json"
SCAN_FILE = "scan.json"


@dataclass(frozen=True)
class Catalog:
    frame: pd.DataFrame  # LIST_COLUMNS + shard, sorted by item_id
    failures: list[Failure]
    labels: list[str]
    empty_files: list[str]  # files of no rows: no item, a warning


def required_columns(cfg: dict) -> list[str]:
    """The columns every file of the dataset must have: the image and label columns, and `id_column` if set."""
    return [cfg["image_column"], cfg["label_column"], *([cfg["id_column"]] if cfg.get("id_column") else [])]


def id_column(cfg: dict) -> str:
    """The dataset's own id column: `id_column`, or else a column named `id` where a file has one."""
    return cfg.get("id_column") or "id"


def with_storage(config: dict) -> dict:
    """The probe_qa section with the workflow's `object_storage` settings beside it (a `data_dir` in a bucket)."""
    return {**config["probe_qa"], "object_storage": config.get("object_storage")}


def _file_labels(handle, column: str) -> list[str]:
    """The distinct values of one file's label column (that column only, row group by row group)."""
    import pyarrow.compute as pc

    if column not in handle.schema_arrow.names:
        raise ValueError(f"no column {column!r} (columns: {', '.join(handle.schema_arrow.names)})")
    seen: set[str] = set()
    for group in range(handle.metadata.num_row_groups):
        values = pc.unique(handle.read_row_group(group, columns=[column]).column(0))
        seen.update(str(v) for v in values.to_pylist() if v is not None)
    return sorted(seen)


def scan(cfg: dict, folder: Path | str | None = None) -> Catalog:
    """Row groups and label set of the dataset, a folder or an s3:// URL (footers and label columns cached in
    `folder`, per file's size and mtime or ETag: a rerun reads no file again, and lists a bucket only)."""
    storage = cfg.get("object_storage")
    root, listed = dataset_files(cfg["data_dir"], "parquet", storage)
    want_labels = not cfg.get("labels")
    cache_path = Path(folder) / SCAN_FILE if folder else None
    try:
        cache = json.loads(cache_path.read_text()) if cache_path else {}
    except (OSError, ValueError):
        cache = {}
    names, counts, failures, labels, fresh, empty = [], [], [], set(), {}, []
    for name, info in listed.items():
        path, stat = join(root, name), [int(info["size"]), info["stamp"]]
        entry = cache.get(name)
        if (not entry or entry["stat"] != stat or "columns" not in entry
                or (want_labels and entry.get("labels") is None and not entry.get("error"))):
            entry = {"stat": stat, "rows": None, "labels": None, "error": None}
            try:
                handle = open_parquet(path, storage, info["size"])
                entry["rows"] = row_counts(handle)
                entry["columns"] = list(handle.schema_arrow.names)
                if want_labels and cfg["label_column"] in entry["columns"]:
                    entry["labels"] = _file_labels(handle, cfg["label_column"])
            except Exception as err:  # noqa: BLE001 - any footer or column error is this file's failure
                entry["error"] = f"not a readable parquet file: {err}"
        fresh[name] = entry
        if entry["error"]:
            failures.append(Failure(name, path, "manifest", "unreadable_table", entry["error"]))
            continue
        lacking = [c for c in required_columns(cfg) if c not in entry["columns"] and not (
            c == AUTO and set(IMAGE_COLUMNS) & set(entry["columns"]))]
        if lacking:
            named = [f"image column ({' / '.join(IMAGE_COLUMNS)}: image_column is auto)" if c == AUTO
                     else f"column {c!r}" for c in lacking]
            failures.append(Failure(name, path, "manifest", "missing_column",
                                    f"no {', '.join(named)} (columns: {', '.join(entry['columns'])})"))
            continue
        if not sum(entry["rows"]):
            log.warning("%s: the parquet file holds no rows (no item of it to probe)", path)
            empty.append(name)
            continue
        names.append(name)
        counts.append(entry["rows"])
        labels.update(entry["labels"] or [])
    if cache_path and fresh != cache:
        write_json(fresh, cache_path)
    frame = row_group_frame(names, counts)
    frame["size"] = [int(listed[f]["size"]) for f in frame["file"]]
    frame["stamp"] = [listed[f]["stamp"] for f in frame["file"]]
    label_list = [str(v) for v in cfg["labels"]] if cfg.get("labels") else sorted(labels)
    return Catalog(frame, failures, label_list, empty)


def count_row_groups(cfg: dict, folder: Path | str | None = None) -> int:
    return len(scan(cfg, folder).frame)


def sync_lists(cfg: dict, lists: ShardLists) -> dict[str, str]:
    catalog = scan(cfg, lists.folder)
    frame = catalog.frame
    lines = encode_lines({c: ("str" if c in ("item_id", "file", "stamp") else "int", frame[c]) for c in LIST_COLUMNS})
    lists.sync(shards_of(frame["item_id"].tolist(), len(lists.names)), lines)
    from mlprep.probe.labels import check_label_mapping

    check_label_mapping(cfg, catalog.labels)  # a label the classifier cannot name stops the run here, not in a job
    labels_path = lists.folder / LABELS_FILE
    data = {"labels": catalog.labels, "source": "config" if cfg.get("labels") else f"column {cfg['label_column']}"}
    try:
        same = json.loads(labels_path.read_text()) == data
    except (OSError, ValueError):
        same = False
    if not same:
        write_json(data, labels_path)
    return lists.fingerprints()


def sync_lists_from(cfg: dict, folder: str, shards: list[str]) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(cfg, ShardLists(folder, shards, LIST_COLUMNS))


def read_labels(path: Path | str) -> list[str]:
    labels = json.loads(Path(path).read_text())["labels"]
    if not labels:
        raise ValueError(f"{path}: the label set is empty (no labels in config and none in the data)")
    return labels


def labels_digest(folder: Path | str) -> str:
    return file_digest(Path(folder) / LABELS_FILE)
