"""The factor: for each sample point, the most similar windows already known at its date, and what followed them.

No look-ahead, by construction: the sample dates are visited in order and a library window enters the
FAISS index on its known_date (the day its forward return is complete), so every search sees exactly the
windows known at that date, and asks for `search_k` of them (plus room for the same-symbol windows that
overlap the query window, which are dropped). A later window can never crowd out an earlier one, and the
factor at a date is the same whether the data end there or years later (tested, with the exact index).
Queries of one date share one FAISS call; the `all` panel is one call per date.

Rerank (`rerank`): the first `max_price_checks` candidates by FAISS score are re-ordered by the Pearson
correlation of raw closes (`corr`) or by the DTW distance between z-normalised closes (`dtw`); the rest
follow in FAISS order; `top_k` are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TextIO

import faiss
import numpy as np
import pandas as pd
from tqdm import tqdm

log = logging.getLogger(__name__)

FACTOR_COLUMNS = ["date", "asset", "win_rate", "mean_fwd_return", "n_matches", "mean_similarity"]
ADD_CHUNK = 65536


@dataclass(frozen=True)
class SearchSpec:
    window: int
    stride: int
    horizon: int
    search_k: int
    top_k: int
    rerank: str = "none"
    max_price_checks: int = 30

    @classmethod
    def from_config(cls, cfg: dict) -> SearchSpec:
        f = cfg["factor"]
        return cls(int(cfg["window"]), int(cfg["stride"]), int(cfg["horizon"]), int(f["search_k"]), int(f["top_k"]),
                   f.get("rerank", "none"), int(f.get("max_price_checks", 30)))

    @property
    def overlap_room(self) -> int:
        """At most this many same-symbol windows known at a date overlap the window ending that date:
        ends in (e - window, e - horizon], one every `stride` bars."""
        return max(0, -(-(self.window - self.horizon) // self.stride))


@dataclass
class Library:
    meta: pd.DataFrame  # mlprep.kline.library.WINDOW_COLUMNS, in (symbol, end_pos) order
    vectors: np.ndarray  # float32 [n, d], unit rows
    closes: np.ndarray  # float32 [n, window]

    def __post_init__(self) -> None:
        self.symbol_code = pd.factorize(self.meta["symbol"], sort=True)[0].astype(np.int64)
        self.end_pos = self.meta["end_pos"].to_numpy(np.int64)
        self.end_date = self.meta["end_date"].to_numpy("datetime64[ns]")
        self.known_date = self.meta["known_date"].to_numpy("datetime64[ns]")
        self.fwd = self.meta["fwd_return"].to_numpy(np.float64)

    def availability(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the windows whose outcome is ever known, in the order they become known; their dates)."""
        known = np.flatnonzero(~np.isnat(self.known_date))
        order = known[np.lexsort((self.end_pos[known], self.symbol_code[known], self.known_date[known]))]
        return order, self.known_date[order]


def pearson(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Correlation of query [g, w] with each of candidates [g, m, w] -> [g, m]."""
    q = query - query.mean(axis=-1, keepdims=True)
    c = candidates - candidates.mean(axis=-1, keepdims=True)
    num = np.einsum("gw,gmw->gm", q, c)
    den = np.sqrt((q * q).sum(-1))[:, None] * np.sqrt((c * c).sum(-1))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def dtw_distance(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """DTW distance (absolute differences, no band) between z-normalised closes: query [g, w] against
    candidates [g, m, w] -> [g, m]; one dynamic-programming sweep over all pairs at once."""
    def z(x):
        std = x.std(axis=-1, keepdims=True)
        return (x - x.mean(axis=-1, keepdims=True)) / np.where(std > 0, std, 1.0)

    q, c = z(query)[:, None, :], z(candidates)
    w = q.shape[-1]
    cost = np.abs(q[..., :, None] - c[..., None, :])  # [g, m, w, w]
    acc = np.full(cost.shape[:2] + (w + 1, w + 1), np.inf)
    acc[..., 0, 0] = 0.0
    for i in range(1, w + 1):
        for j in range(1, w + 1):
            best = np.minimum(np.minimum(acc[..., i - 1, j], acc[..., i, j - 1]), acc[..., i - 1, j - 1])
            acc[..., i, j] = cost[..., i - 1, j - 1] + best
    return acc[..., w, w]


def select_matches(lib: Library, spec: SearchSpec, q_rows: np.ndarray, scores: np.ndarray, rows: np.ndarray):
    """(chosen mask [g, K], ordered rows [g, K], FAISS scores [g, K]) from raw hits (rows -1 where none)."""
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    same = lib.symbol_code[safe] == lib.symbol_code[q_rows][:, None]
    overlap = same & (lib.end_pos[safe] > (lib.end_pos[q_rows] - spec.window)[:, None])
    valid &= ~overlap
    rank = np.cumsum(valid, axis=1)
    valid &= rank <= spec.search_k
    if spec.rerank == "none":
        key = np.where(valid, rank, np.inf)
    else:
        checked = valid & (rank <= spec.max_price_checks)
        width = int(min(spec.max_price_checks, rows.shape[1]))
        # the first `width` columns hold every checked candidate once the dropped ones are moved out
        pos = np.argsort(~checked, axis=1, kind="stable")[:, :width]
        cand = np.take_along_axis(safe, pos, axis=1)
        q_closes, c_closes = lib.closes[q_rows].astype(np.float64), lib.closes[cand].astype(np.float64)
        if spec.rerank == "corr":
            measure = -pearson(q_closes, c_closes)
        else:
            measure = dtw_distance(q_closes, c_closes)
        key = np.where(valid, 1e9 + rank, np.inf)
        checked_here = np.take_along_axis(checked, pos, axis=1)
        np.put_along_axis(key, pos, np.where(checked_here, measure, np.take_along_axis(key, pos, axis=1)), axis=1)
    order = np.argsort(key, axis=1, kind="stable")[:, : spec.top_k]
    chosen = np.isfinite(np.take_along_axis(key, order, axis=1))
    return chosen, np.take_along_axis(safe, order, axis=1), np.take_along_axis(scores, order, axis=1)


def factor_for(lib: Library, q_rows: np.ndarray, index: faiss.Index, spec: SearchSpec,
               progress: TextIO | None = None) -> pd.DataFrame:
    """FACTOR_COLUMNS for the query windows `q_rows`; `index` is an empty (trained) FAISS index."""
    if index.ntotal:
        raise ValueError("the factor's index must start empty: windows enter it as they become known")
    avail, avail_dates = lib.availability()
    q_rows = q_rows[np.lexsort((lib.symbol_code[q_rows], lib.end_date[q_rows]))]
    q_dates = lib.end_date[q_rows]
    starts = np.flatnonzero(np.r_[True, q_dates[1:] != q_dates[:-1]])
    bounds = np.r_[starts, len(q_rows)]
    fetch = spec.search_k + spec.overlap_room
    out = {"win_rate": np.full(len(q_rows), np.nan), "mean_fwd_return": np.full(len(q_rows), np.nan),
           "n_matches": np.zeros(len(q_rows), np.int64), "mean_similarity": np.full(len(q_rows), np.nan)}
    added = 0
    for a, b in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="factor", unit="date", file=progress, mininterval=2.0):
        upto = int(np.searchsorted(avail_dates, q_dates[a], side="right"))
        for start in range(added, upto, ADD_CHUNK):
            index.add(lib.vectors[avail[start : min(upto, start + ADD_CHUNK)]])
        added = max(added, upto)
        if index.ntotal == 0:
            continue
        group = q_rows[a:b]
        scores, ids = index.search(lib.vectors[group], int(min(fetch, index.ntotal)))
        rows = np.where(ids >= 0, avail[np.maximum(ids, 0)], -1)
        chosen, match_rows, match_scores = select_matches(lib, spec, group, scores, rows)
        n = chosen.sum(axis=1)
        fwd = np.where(chosen, lib.fwd[match_rows], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["win_rate"][a:b] = np.where(n > 0, ((fwd > 0) & chosen).sum(axis=1) / n, np.nan)
            out["mean_fwd_return"][a:b] = np.where(n > 0, fwd.sum(axis=1) / n, np.nan)
            out["mean_similarity"][a:b] = np.where(n > 0, np.where(chosen, match_scores, 0).sum(axis=1) / n, np.nan)
        out["n_matches"][a:b] = n
    return pd.DataFrame({"date": q_dates, "asset": lib.meta["symbol"].to_numpy()[q_rows], **out})[FACTOR_COLUMNS]


def sample_rows(lib: Library, samples, warmup_bars: int, seed: int, points: pd.DataFrame | None = None) -> np.ndarray:
    """Library rows of the sample points: `all` (every window past the warm-up), a count (seeded random
    ones of those), or `points` (date, asset) from a sample file (each must name a window)."""
    from mlprep.rng import rng_for

    eligible = np.flatnonzero(lib.end_pos >= warmup_bars)
    if points is not None:
        key = pd.MultiIndex.from_arrays([lib.meta["symbol"], lib.meta["end_date"]])
        wanted = pd.MultiIndex.from_arrays([points["asset"].astype(str), pd.to_datetime(points["date"])])
        rows = key.get_indexer(wanted)
        return np.unique(rows[rows >= 0])
    if samples == "all":
        return eligible
    count = min(int(samples), len(eligible))
    return np.sort(rng_for(seed, "kline-samples").choice(eligible, count, replace=False))
