"""Pattern library: every `window`-bar window of every symbol, with what followed it.

For each window ending at bar e (e = window-1, window-1+stride, ...: the same ends whatever the data's
length, so a file that grows keeps its old windows bit for bit):
  end_date        the date of bar e (the day the window is complete)
  fwd_return      close[e + horizon] / close[e] - 1, NaN when the file ends first
  known_date      the date of bar e + horizon: from that day on the window's outcome is known, so it may
                  serve as a match; NaT when the file ends first
and its embedding, L2-normalised float32:
  price (default) the z-normalised close path (inner product of two = their Pearson correlation), with
                  `channels` ohlc: open/high/low on the close's scale too, volume: the z-normalised volume
  chart           the window drawn as a candlestick image and encoded by the CLIP encoder (mlprep.kline.chart)
The raw closes of each window are kept too, for the factor's rerank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from mlprep.failures import FailureLog, ItemError, describe_error, write_failures
from mlprep.io import atomic_dir, save_npy, write_parquet
from mlprep.kline.catalog import LIST_COLUMNS
from mlprep.kline.prices import ROW_STAGE, read_bars
from mlprep.sharding import ShardId
from mlprep.shardlists import ShardLists
from mlprep.stats import ShardStats, scheduler_ids

log = logging.getLogger(__name__)

SHARD_FILES = {"windows": "windows.parquet", "embeddings": "embeddings.npy", "closes": "closes.npy",
               "failures": "failures.parquet", "stats": "stats.json"}
WINDOW_COLUMNS = ["symbol", "end_pos", "end_date", "known_date", "fwd_return"]


@dataclass(frozen=True)
class WindowSpec:
    window: int
    stride: int
    horizon: int
    channels: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: dict) -> WindowSpec:
        return cls(int(cfg["window"]), int(cfg["stride"]), int(cfg["horizon"]), tuple(cfg.get("channels") or ()))

    @property
    def min_bars(self) -> int:
        return self.window + self.horizon


def _znorm(rows: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (rows - mean) / np.where(std > 0, std, 1.0)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def window_ends(n_bars: int, spec: WindowSpec) -> np.ndarray:
    return np.arange(spec.window - 1, n_bars, spec.stride, dtype=np.int64)


def price_embedding(bars: pd.DataFrame, ends: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """[len(ends), dims]: the z-normalised close path (+ channels), L2-normalised."""
    starts = ends - spec.window + 1
    closes = sliding_window_view(bars["close"].to_numpy(np.float64), spec.window)[starts]
    mean, std = closes.mean(axis=1, keepdims=True), closes.std(axis=1, keepdims=True)
    parts = [_znorm(closes, mean, std)]
    if "ohlc" in spec.channels:
        for name in ("open", "high", "low"):
            parts.append(_znorm(sliding_window_view(bars[name].to_numpy(np.float64), spec.window)[starts], mean, std))
    if "volume" in spec.channels:
        volume = sliding_window_view(bars["volume"].to_numpy(np.float64), spec.window)[starts]
        parts.append(_znorm(volume, volume.mean(axis=1, keepdims=True), volume.std(axis=1, keepdims=True)))
    return unit_rows(np.concatenate(parts, axis=1))


def symbol_windows(symbol: str, bars: pd.DataFrame, spec: WindowSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """The windows of one symbol (WINDOW_COLUMNS) and their raw closes [n, window] (float32)."""
    n = len(bars)
    ends = window_ends(n, spec)
    close = bars["close"].to_numpy(np.float64)
    dates = bars["date"].to_numpy("datetime64[ns]")
    ahead = ends + spec.horizon
    known = ahead < n
    fwd = np.full(len(ends), np.nan)
    fwd[known] = close[ahead[known]] / close[ends[known]] - 1.0
    known_date = np.full(len(ends), np.datetime64("NaT"), dtype="datetime64[ns]")
    known_date[known] = dates[ahead[known]]
    meta = pd.DataFrame({"symbol": symbol, "end_pos": ends, "end_date": dates[ends], "known_date": known_date,
                         "fwd_return": fwd})
    closes = sliding_window_view(close, spec.window)[ends - spec.window + 1].astype(np.float32)
    return meta, closes


def chart_encoder(cfg: dict, seed: int, device_spec: str, precision_spec: str, threads: int):
    """The CLIP encoder behind `embedding: chart` (the foundation's, loaded as sku_index loads it)."""
    from mlprep.encoders import load_image_encoder
    from mlprep.kline.chart import ChartEncoder

    chart = cfg["chart"]
    encoder = load_image_encoder(chart["model"], int(chart["batch_size"]), device_spec, precision_spec, threads, seed)
    return ChartEncoder(encoder, int(chart["size"]))


def build_shard(shard_text: str, list_path: Path | str, cfg: dict, continue_on_error: bool, out_dir: Path | str,
                progress: TextIO | None = None, seed: int = 0, device_spec: str = "cpu",
                precision_spec: str = "fp32", threads: int = 1) -> dict:
    """One shard's symbols -> windows, embeddings, closes, failures (the folder is written whole or not at all)."""
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    spec = WindowSpec.from_config(cfg)
    chart = cfg.get("embedding") == "chart"
    encoder = chart_encoder(cfg, seed, device_spec, precision_spec, threads) if chart else None
    failures = FailureLog(continue_on_error)
    metas, closes, vectors = [], [], []
    items = ShardLists.read(list_path, LIST_COLUMNS)
    for item in tqdm(items, desc="library", unit="symbol", file=progress, mininterval=2.0):
        try:
            bars = read_bars(item["symbol"], item["path"], spec.min_bars, bool(cfg.get("adjusted", True)))
        except ItemError as err:
            failures.record(item["symbol"], item["path"], "read", err.code, str(err))
            continue
        except Exception as err:  # noqa: BLE001 - an unexpected reader error is still this file's failure
            failures.record(item["symbol"], item["path"], "read", *describe_error(err, "unreadable_table"))
            continue
        failures.extend(bars.failures)
        meta, window_closes = symbol_windows(item["symbol"], bars.frame, spec)
        metas.append(meta)
        closes.append(window_closes)
        if cfg.get("embedding", "price") == "price":
            vectors.append(price_embedding(bars.frame, meta["end_pos"].to_numpy(), spec))
        else:
            vectors.append(encoder.encode_windows(bars.frame, meta["end_pos"].to_numpy(), spec))
        stats.first_item_done()
    meta = pd.concat(metas, ignore_index=True) if metas else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in zip(WINDOW_COLUMNS, ["str", "int64", "datetime64[ns]", "datetime64[ns]",
                                                                  "float64"])})
    dim = vectors[0].shape[1] if vectors else 0
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    close_matrix = np.concatenate(closes) if closes else np.zeros((0, spec.window), np.float32)
    stats.ok, stats.failed = len(metas), sum(f.stage != ROW_STAGE for f in failures.records)
    stats.counts = {"windows": len(meta), "known_windows": int(meta["known_date"].notna().sum())}
    stats.extra = {"embedding": cfg.get("embedding", "price"), "dims": int(dim), "bad_rows": sum(
        f.stage == ROW_STAGE for f in failures.records), **scheduler_ids()}
    with atomic_dir(out_dir) as folder:
        write_parquet(meta[WINDOW_COLUMNS], folder / SHARD_FILES["windows"], "kline.windows")
        save_npy(np.ascontiguousarray(matrix, dtype=np.float32), folder / SHARD_FILES["embeddings"])
        save_npy(np.ascontiguousarray(close_matrix), folder / SHARD_FILES["closes"])
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data
