"""The kline_factor pipeline's steps besides the library shards (mlprep.kline.library): manifest, gather +
index, factor, evaluate."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TextIO

import faiss
import numpy as np
import pandas as pd

from mlprep.failures import Failure, FailureLog, check_failed_share, count_by_code, read_failures, write_failures
from mlprep.indexing import EXACT_FACTORIES, apply_search_params, build_index, read_index, recall_at_k, write_index
from mlprep.io import atomic_path, load_npy, read_json, save_npy, write_json, write_parquet
from mlprep.kline.catalog import list_catalog
from mlprep.kline.library import SHARD_FILES, WINDOW_COLUMNS
from mlprep.kline.prices import ROW_STAGE
from mlprep.kline.search import Library, SearchSpec, factor_for, sample_rows
from mlprep.rng import rng_for

log = logging.getLogger(__name__)


def manifest(cfg: dict, n_shards: int, continue_on_error: bool, outputs: dict) -> None:
    catalog = list_catalog(cfg, n_shards)
    failures = FailureLog(continue_on_error)
    failures.extend(catalog.failures)
    write_parquet(catalog.frame, outputs["manifest"], "kline.manifest")
    write_failures(failures.records, outputs["failures"])
    log.info("%d symbols in %d shards, %d failures", len(catalog.frame), n_shards, len(failures))


def load_library(windows, embeddings, closes, series_checks=None) -> Library:
    """The library; with `series_checks`, near-identical symbols share one history (mlprep.kline.duplicates)."""
    from mlprep.kline.duplicates import histories

    same = histories(pd.read_parquet(series_checks)) if series_checks else {}
    return Library(pd.read_parquet(windows), load_npy(embeddings), load_npy(closes), same)


def gather(shard_dirs: list[str], manifest_failures: str, cfg: dict, seed: int, outputs: dict) -> dict:
    """The shards' windows in (symbol, end_pos) order, one FAISS index over them, failures, summary."""
    folders = [Path(d) for d in shard_dirs]
    metas = [pd.read_parquet(f / SHARD_FILES["windows"]) for f in folders]
    vectors = [load_npy(f / SHARD_FILES["embeddings"]) for f in folders]
    closes = [load_npy(f / SHARD_FILES["closes"]) for f in folders]
    dims = {v.shape[1] for v in vectors if len(v)}
    if len(dims) > 1:
        raise ValueError(f"kline_factor: shards made embeddings of different sizes {sorted(dims)}; rerun them all")
    dim = dims.pop() if dims else 0
    meta = pd.concat(metas, ignore_index=True)[WINDOW_COLUMNS]
    matrix = np.concatenate([v.reshape(-1, dim) for v in vectors]) if vectors else np.zeros((0, dim), np.float32)
    close_matrix = np.concatenate(closes) if closes else np.zeros((0, int(cfg["window"])), np.float32)
    order = np.lexsort((meta["end_pos"].to_numpy(), meta["symbol"].to_numpy(dtype=str)))
    meta, matrix, close_matrix = meta.iloc[order].reset_index(drop=True), matrix[order], close_matrix[order]
    if not len(meta):
        raise ValueError("kline_factor: no symbol gave a window (see failures.parquet)")
    index_cfg = cfg["index"]
    index = build_index(np.ascontiguousarray(matrix), index_cfg["factory"], seed, int(index_cfg["train_sample"]))
    apply_search_params(index, index_cfg.get("search_params"))
    recall = None
    if index_cfg["factory"] not in EXACT_FACTORIES:
        n = min(len(matrix), int(index_cfg["recall_sample"]))
        queries = matrix[np.sort(rng_for(seed, "kline-recall").choice(len(matrix), n, replace=False))]
        recall = recall_at_k(index, matrix, queries, 10)
    from mlprep.kline.duplicates import near_identical

    series_checks = near_identical(meta, matrix, close_matrix, min_common=2 * int(cfg["window"]))
    for row in series_checks.itertuples(index=False):
        log.warning("near-identical price histories: %s and %s (%d common bars, return correlation %.4f): their "
                    "matches count once", row.symbol_a, row.symbol_b, row.common_bars, row.return_corr)
    write_parquet(series_checks, outputs["series_checks"], "kline.series_checks")
    write_parquet(meta, outputs["library"], "kline.windows")
    save_npy(np.ascontiguousarray(matrix), outputs["embeddings"])
    save_npy(np.ascontiguousarray(close_matrix), outputs["closes"])
    write_index(index, outputs["index"])
    failures = read_failures([manifest_failures, *(f / SHARD_FILES["failures"] for f in folders)])
    write_parquet(failures, outputs["failures"], "failures")
    stats = [read_json(f / SHARD_FILES["stats"]) for f in folders]
    summary = {
        "symbols_ok": int(meta["symbol"].nunique()),
        "symbols_failed": int((failures["stage"] != ROW_STAGE).sum()),
        "rows_dropped": int((failures["stage"] == ROW_STAGE).sum()),
        "windows": int(len(meta)), "known_windows": int(meta["known_date"].notna().sum()), "dims": int(dim),
        "first_date": str(meta["end_date"].min().date()), "last_date": str(meta["end_date"].max().date()),
        "index": index_cfg["factory"], "recall_at_10": recall, "failures_by_code": count_by_code(failures),
        "near_identical_pairs": int(len(series_checks)),
        "shards": {s["shard"]: {k: s.get(k) for k in ("items_ok", "items_failed", "windows", "seconds")}
                   for s in stats},
    }
    write_json(summary, outputs["summary"])
    log.info("library: %s", {k: v for k, v in summary.items() if k != "shards"})
    return summary


def check(summary_path, failures_path, max_failed_fraction: float, out) -> dict:
    summary = read_json(summary_path)
    failures = pd.read_parquet(failures_path)
    files = failures[failures["stage"] != ROW_STAGE]  # a dropped row is not a failed symbol
    result = check_failed_share("kline_factor", summary["symbols_ok"], files, max_failed_fraction, failures_path)
    result["windows"] = summary["windows"]
    write_json(result, out)
    return result


def empty_index_like(path) -> faiss.Index:
    """The library's index, trained but emptied: the factor adds windows as they become known."""
    index = read_index(path)
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    index.reset()
    return index


class EmptyFactorError(ValueError):
    """No sample point names a window: the factor would be empty; the message says why."""


def point_failures(lib: Library, points: pd.DataFrame, sample_file) -> list[Failure]:
    """A failure per sample-file row that names no window, with its line (the header is line 1)."""
    from mlprep.kline.search import point_rows

    name = Path(str(sample_file)).name
    rows = point_rows(lib, points)
    out = []
    for k in np.flatnonzero(rows < 0):
        asset, date = points["asset"].iat[k], points["date"].iat[k]
        out.append(Failure(f"{name}@row{k + 2}", str(sample_file), "sample", "unknown_point",
                           f"no window of {asset!s} ends on {date!s} (no such symbol or bar, or too early for a "
                           f"whole window)"))
    return out


def empty_factor_cause(lib: Library, fcfg: dict, warmup: int, points, failures: list[Failure]) -> str:
    if points is not None:
        shown = "; ".join(f"line {f.item_id.rsplit('@row', 1)[1]}: {f.reason}" for f in failures[:3])
        return (f"kline_factor: none of the {len(points)} rows of {fcfg['sample_file']} names a window, so the factor "
                f"is empty ({shown}{' ...' if len(failures) > 3 else ''}); the library's dates run from "
                f"{pd.Timestamp(lib.end_date.min()).date() if len(lib.end_date) else '-'} to "
                f"{pd.Timestamp(lib.end_date.max()).date() if len(lib.end_date) else '-'}")
    return (f"kline_factor: no window is past the warm-up of {warmup} bars (the library holds {len(lib.meta)} "
            f"windows), so the factor is empty: give the symbols more bars or lower factor.warmup_bars")


def factor(library: dict, index_path, cfg: dict, seed: int, outputs: dict, progress: TextIO | None = None) -> dict:
    lib = load_library(library["windows"], library["embeddings"], library["closes"], library.get("series_checks"))
    spec = SearchSpec.from_config(cfg)
    fcfg = cfg["factor"]
    points = None
    if fcfg.get("sample_file"):
        points = pd.read_csv(fcfg["sample_file"]) if str(fcfg["sample_file"]).endswith(".csv") else pd.read_parquet(
            fcfg["sample_file"])
        missing = [c for c in ("date", "asset") if c not in points.columns]
        if missing:
            raise ValueError(f"{fcfg['sample_file']}: sample file lacks column(s) {', '.join(missing)}")
    warmup = max(int(fcfg["warmup_bars"]), spec.window - 1)
    rows = sample_rows(lib, fcfg["samples"], warmup, seed, points)
    failures = point_failures(lib, points, fcfg["sample_file"]) if points is not None else []
    if not len(rows):
        raise EmptyFactorError(empty_factor_cause(lib, fcfg, warmup, points, failures))
    index = empty_index_like(index_path)
    apply_search_params(index, cfg["index"].get("search_params"))
    full = read_index(index_path)  # every window, id = library row: the deep search of thinly spread points
    apply_search_params(full, cfg["index"].get("search_params"))
    result = factor_for(lib, rows, index, spec, progress, full_index=full)
    write_parquet(result, outputs["factor"], "kline.factor")
    write_failures(failures, outputs["failures"])
    stats = {"samples": int(len(result)), "with_matches": int((result["n_matches"] > 0).sum()),
             "mean_matches": float(result["n_matches"].mean()) if len(result) else None,
             "rerank": spec.rerank, "search_k": spec.search_k, "top_k": spec.top_k,
             "spec": dataclasses.asdict(spec)}  # the search, as `mlprep serve` repeats it
    if points is not None:
        stats["sample_points_not_found"] = len(failures)
    write_json(stats, outputs["stats"])
    log.info("factor: %s", stats)
    return stats


def evaluate(factor_path, library_path, cfg: dict, seed: int, outputs: dict) -> dict:
    from mlprep.kline import evaluate as metrics

    frame = pd.read_parquet(factor_path)
    meta = pd.read_parquet(library_path, columns=WINDOW_COLUMNS)
    realised = meta.set_index(["symbol", "end_date"])["fwd_return"]
    frame["realised"] = realised.reindex(pd.MultiIndex.from_arrays([frame["asset"], frame["date"]])).to_numpy()
    known = meta[meta["known_date"].notna()].sort_values(["known_date", "symbol", "end_pos"], kind="stable")
    frame["baseline"] = metrics.random_baseline(
        known["known_date"].to_numpy("datetime64[ns]"), known["fwd_return"].to_numpy(),
        frame["date"].to_numpy("datetime64[ns]"), frame["n_matches"].to_numpy(), seed)
    ecfg = cfg["eval"]
    frame["factor"] = frame["win_rate"]
    factor_result, per_date = metrics.ic_summary(frame, "factor", int(ecfg["min_assets"]), int(ecfg["quantiles"]))
    baseline_result, _ = metrics.ic_summary(frame, "baseline", int(ecfg["min_assets"]), int(ecfg["quantiles"]))
    mean_return = metrics.ic_summary(frame.assign(factor=frame["mean_fwd_return"]), "factor",
                                     int(ecfg["min_assets"]), int(ecfg["quantiles"]))[0]
    result = {"factor": factor_result, "baseline": baseline_result, "mean_fwd_return_factor": mean_return,
              "horizon_bars": int(cfg["horizon"]),
              "note": "IC: Spearman correlation of win_rate with the sample's realised forward return; baseline: "
                      "the same number of random matches known at each date"}
    write_json(result, outputs["eval"])
    with atomic_path(outputs["plot"]) as tmp:
        metrics.plot(frame, per_date, result, tmp)
    log.info("evaluation: %s", result)
    return result
