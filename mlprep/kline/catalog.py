"""Listing the price files: one symbol per file in `prices_dir` ({symbol}.csv or {symbol}.parquet).

A symbol's shard is a stable hash of its name, so appending bars to a file or adding a symbol rewrites
one shard list (the file's size and mtime are in it) and reruns only that shard's library job.
Symbols are file names, never paths: output names derived from them go through mlprep.ids.safe_filename.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlprep.failures import Failure
from mlprep.files import file_stats
from mlprep.ids import shards_of
from mlprep.kline.prices import PRICE_EXTS, symbol_of
from mlprep.shardlists import ShardLists, encode_lines

# What a shard's list holds per symbol: its name, file, and the file's size and mtime.
LIST_COLUMNS = ["symbol", "path", "size", "mtime_ns"]


@dataclass(frozen=True)
class Catalog:
    frame: pd.DataFrame  # symbol, path, shard, size, mtime_ns; sorted by symbol
    failures: list[Failure]


def scan_prices(folder: Path | str) -> pd.DataFrame:
    """Every price file directly in `folder` (hidden files skipped), with its symbol."""
    rows = []
    for entry in os.scandir(folder):
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(PRICE_EXTS):
            rows.append((symbol_of(entry.name), entry.path))
    return pd.DataFrame(rows, columns=["symbol", "path"]).sort_values(["symbol", "path"]).reset_index(drop=True)


def list_catalog(cfg: dict, n_shards: int) -> Catalog:
    """The symbols, each with its shard; two files of one symbol (S.csv and S.parquet) keep the first."""
    frame = scan_prices(cfg["prices_dir"])
    failures: list[Failure] = []
    repeated = frame["symbol"].duplicated(keep="first")
    first = dict(zip(frame["symbol"][::-1], frame["path"][::-1]))
    for symbol, path in zip(frame["symbol"][repeated], frame["path"][repeated]):
        failures.append(Failure(symbol, path, "manifest", "duplicate_id",
                                f"symbol already read from {first[symbol]}, which is kept"))
    frame = frame[~repeated].reset_index(drop=True)
    frame["shard"] = shards_of(frame["symbol"].tolist(), n_shards)
    size, mtime = file_stats(frame["path"].tolist())
    return Catalog(frame.assign(size=size, mtime_ns=mtime), failures)


def count_symbols(cfg: dict) -> int:
    return len(scan_prices(cfg["prices_dir"]))


def sync_lists(cfg: dict, lists: ShardLists) -> dict[str, str]:
    catalog = list_catalog(cfg, len(lists.names))
    frame = catalog.frame
    lines = encode_lines({c: ("int" if c in ("size", "mtime_ns") else "str", frame[c]) for c in LIST_COLUMNS})
    lists.sync(frame["shard"].to_numpy(), lines)
    return lists.fingerprints()


def sync_lists_from(cfg: dict, folder: str, shards: list[str]) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(cfg, ShardLists(folder, shards, LIST_COLUMNS))
