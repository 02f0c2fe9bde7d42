"""The factor: for each sample point, the most similar windows already known at its date, and what followed them.

No look-ahead, by construction: the sample dates are visited in order and a library window enters the
FAISS index on its known_date (the day its forward return is complete), so every search sees exactly the
windows known at that date, and asks for `search_k` of them (plus room for the same-symbol windows that
overlap the query window, which are dropped). A later window can never crowd out an earlier one, and the
factor at a date is the same whether the data end there or years later (tested, with the exact index).
Queries of one date share one FAISS call; the `all` panel is one call per date.

Sample points spread thinly over many dates (the seed's 600 random points) would make that one small search
per date. For them the full index is searched once for all points, and the windows known at each point's date
are kept from its ranking (the known windows of a ranking over all windows, in order, are the ranking over the
known ones); a point whose ranking holds too few known windows is scored directly against exactly the windows
known at its date. The matches are the walk's (a test holds the two paths to each other).

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
SPARSE_DATES = 4  # fewer than this many sample points per date on average: the deep batched search
BATCH_QUERIES = 4096  # sample points per batched search
DTW_CELLS = 1 << 22  # dynamic-programming cells per DTW sweep (~32 MB)
DIRECT_CELLS = 1 << 24  # points x windows per direct scoring product (~64 MB)


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
    same_history: dict[str, str] | None = None  # symbol -> its history, for near-identical series

    def __post_init__(self) -> None:
        self.symbol_code = pd.factorize(self.meta["symbol"], sort=True)[0].astype(np.int64)
        self.end_pos = self.meta["end_pos"].to_numpy(np.int64)
        self.end_date = self.meta["end_date"].to_numpy("datetime64[ns]")
        self.known_date = self.meta["known_date"].to_numpy("datetime64[ns]")
        self.fwd = self.meta["fwd_return"].to_numpy(np.float64)
        self._availability: tuple[np.ndarray, np.ndarray] | None = None
        # windows of near-identical series share a history: the own-window exclusion and match counting use it
        same = self.same_history or {}
        self.history_code = pd.factorize(self.meta["symbol"].map(lambda s: same.get(s, s)), sort=True)[0].astype(
            np.int64) if same else self.symbol_code
        if same:
            self.start_date = self._start_dates()

    def _start_dates(self) -> np.ndarray:
        """Each window's first bar's date, as the end date of the symbol's window ending on that bar (or the first
        one after it, for the windows within a window of the history's start)."""
        out = np.empty_like(self.end_date)
        window = self.closes.shape[1]
        bounds = np.flatnonzero(np.r_[True, self.symbol_code[1:] != self.symbol_code[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            pos = self.end_pos[a:b]
            at = np.minimum(np.searchsorted(pos, pos - window + 1), b - a - 1)
            out[a:b] = self.end_date[a:b][at]
        return out

    def availability(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the windows whose outcome is ever known, in the order they become known; their dates).
        Sorted once per library: every batch of the deep search asks for it."""
        if self._availability is None:
            known = np.flatnonzero(~np.isnat(self.known_date))
            order = known[np.lexsort((self.end_pos[known], self.symbol_code[known], self.known_date[known]))]
            self._availability = (order, self.known_date[order])
        return self._availability


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

    g, m, w = candidates.shape
    out = np.empty((g, m))
    step = max(1, DTW_CELLS // max(1, m * (w + 1) ** 2))  # bounded [chunk, m, w+1, w+1] tables
    for a in range(0, g, step):
        q, c = z(query[a : a + step])[:, None, :], z(candidates[a : a + step])
        cost = np.abs(q[..., :, None] - c[..., None, :])  # [chunk, m, w, w]
        acc = np.full(cost.shape[:2] + (w + 1, w + 1), np.inf)
        acc[..., 0, 0] = 0.0
        for i in range(1, w + 1):
            for j in range(1, w + 1):
                best = np.minimum(np.minimum(acc[..., i - 1, j], acc[..., i, j - 1]), acc[..., i - 1, j - 1])
                acc[..., i, j] = cost[..., i - 1, j - 1] + best
        out[a : a + step] = acc[..., w, w]
    return out


def select_matches(lib: Library, spec: SearchSpec, q_rows: np.ndarray, scores: np.ndarray, rows: np.ndarray):
    """(chosen mask [g, K], ordered rows [g, K], FAISS scores [g, K]) from raw hits (rows -1 where none)."""
    valid = rows >= 0
    safe = np.where(valid, rows, 0)
    own = lib.symbol_code[safe] == lib.symbol_code[q_rows][:, None]
    valid &= ~(own & (lib.end_pos[safe] > (lib.end_pos[q_rows] - spec.window)[:, None]))
    if lib.history_code is not lib.symbol_code:  # near-identical series in the library
        same = lib.history_code[safe] == lib.history_code[q_rows][:, None]
        valid &= ~(same & ~own & (lib.end_date[safe] >= lib.start_date[q_rows][:, None]))  # a copy's overlap: by date
        valid &= ~_repeated_history(lib, safe, valid)
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


def _repeated_history(lib: Library, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[g, K]: the hits that are a copy of a better-ranked valid hit (the same history's window ending the same
    date): a match from near-identical series counts once."""
    day = lib.end_date[rows].astype("datetime64[D]").astype(np.int64)
    key = lib.history_code[rows] * (1 << 32) + (day - day.min() if day.size else day)
    cols = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)
    key = np.where(valid, key, -1 - cols)  # invalid hits never hide a valid one
    order = np.lexsort((cols, key))  # along each row: by key, then by rank
    sorted_key = np.take_along_axis(key, order, axis=1)
    repeat_sorted = np.zeros_like(valid)
    repeat_sorted[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    out = np.zeros_like(valid)
    np.put_along_axis(out, order, repeat_sorted, axis=1)
    return out & valid


def similarities(lib: Library, q_rows: np.ndarray, match_rows: np.ndarray) -> np.ndarray:
    """Inner products [g, k] of each query window with its matches, in float64, pair by pair: the same value
    whichever search found the match (FAISS's float32 scores round differently with the search's shape)."""
    out = np.empty(match_rows.shape)
    step = max(1, (1 << 22) // max(1, match_rows.shape[1] * lib.vectors.shape[1]))
    for a in range(0, len(q_rows), step):
        q = lib.vectors[q_rows[a : a + step]].astype(np.float64)[:, None, :]
        out[a : a + step] = (q * lib.vectors[match_rows[a : a + step]].astype(np.float64)).sum(axis=-1)
    return out


def _aggregate(lib: Library, out: dict, part: slice, q_rows: np.ndarray, chosen, match_rows) -> None:
    n = chosen.sum(axis=1)
    fwd = np.where(chosen, lib.fwd[match_rows], 0.0)
    sims = similarities(lib, q_rows, match_rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["win_rate"][part] = np.where(n > 0, ((fwd > 0) & chosen).sum(axis=1) / n, np.nan)
        out["mean_fwd_return"][part] = np.where(n > 0, fwd.sum(axis=1) / n, np.nan)
        out["mean_similarity"][part] = np.where(n > 0, np.where(chosen, sims, 0).sum(axis=1) / n, np.nan)
    out["n_matches"][part] = n


def known_hits(lib: Library, full_index: faiss.Index, q_rows: np.ndarray, fetch: int,
               first_depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, library rows) [len(q_rows), fetch] of the best windows known at each query's date, rows -1
    where fewer exist. One batched search of `full_index` (every library row, id = row) ranks the whole
    library; a query whose top `4 x fetch` holds fewer than `fetch` known windows (an early date, when few
    are known) is scored directly against exactly the windows known at its date instead."""
    dates = lib.end_date[q_rows]
    scores = np.full((len(q_rows), fetch), -np.inf, dtype=np.float32)
    rows = np.full((len(q_rows), fetch), -1, dtype=np.int64)
    depth = min(full_index.ntotal, first_depth or 4 * fetch)
    found_scores, found = full_index.search(lib.vectors[q_rows], depth)
    known = (found >= 0) & (lib.known_date[np.maximum(found, 0)] <= dates[:, None])
    done = (known.sum(axis=1) >= fetch) | (depth >= full_index.ntotal)
    keep = np.argsort(~known[done], axis=1, kind="stable")[:, :fetch]  # the known ones, best first
    width = keep.shape[1]
    picked = np.take_along_axis(known[done], keep, axis=1)
    rows[done, :width] = np.where(picked, np.take_along_axis(found[done], keep, axis=1), -1)
    scores[done, :width] = np.where(picked, np.take_along_axis(found_scores[done], keep, axis=1), -np.inf)
    late = np.flatnonzero(~done)
    if len(late):
        avail, avail_dates = lib.availability()
        counts = np.searchsorted(avail_dates, dates[late], side="right")  # windows known at each date
        late, counts = late[np.argsort(counts, kind="stable")], np.sort(counts, kind="stable")
        pool = np.ascontiguousarray(lib.vectors[avail[: counts[-1]]])  # in the order they become known
        step = max(1, DIRECT_CELLS // max(1, int(counts[-1])))
        for a in range(0, len(late), step):
            part, known_n = late[a : a + step], counts[a : a + step]
            width_n = int(known_n[-1])
            if width_n == 0:
                continue
            sims = lib.vectors[q_rows[part]] @ pool[:width_n].T  # one product for the chunk
            sims[np.arange(width_n)[None, :] >= known_n[:, None]] = -np.inf  # not yet known at that date
            take = min(fetch, width_n)
            top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
            top_sims = np.take_along_axis(sims, top, axis=1)
            order = np.lexsort((top, -top_sims), axis=1)  # best first, ties by the order of becoming known
            top, top_sims = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sims, order, axis=1)
            ok = np.isfinite(top_sims)
            rows[part, :take] = np.where(ok, avail[top], -1)
            scores[part, :take] = np.where(ok, top_sims, -np.inf)
    return scores, rows


def factor_for(lib: Library, q_rows: np.ndarray, index: faiss.Index, spec: SearchSpec,
               progress: TextIO | None = None, full_index: faiss.Index | None = None) -> pd.DataFrame:
    """FACTOR_COLUMNS for the query windows `q_rows`. `index` is an empty (trained) FAISS index that the
    walk over the dates fills; with `full_index` (every library row, id = row) and sample points on many
    dates, the deep batched search (known_hits) is used instead."""
    if index.ntotal:
        raise ValueError("the factor's index must start empty: windows enter it as they become known")
    q_rows = q_rows[np.lexsort((lib.symbol_code[q_rows], lib.end_date[q_rows]))]
    q_dates = lib.end_date[q_rows]
    starts = np.flatnonzero(np.r_[True, q_dates[1:] != q_dates[:-1]])
    bounds = np.r_[starts, len(q_rows)]
    fetch = spec.search_k + spec.overlap_room
    out = {"win_rate": np.full(len(q_rows), np.nan), "mean_fwd_return": np.full(len(q_rows), np.nan),
           "n_matches": np.zeros(len(q_rows), np.int64), "mean_similarity": np.full(len(q_rows), np.nan)}
    if full_index is not None and len(starts) * SPARSE_DATES > len(q_rows):
        for a in range(0, len(q_rows), BATCH_QUERIES):
            part = slice(a, a + BATCH_QUERIES)
            scores, rows = known_hits(lib, full_index, q_rows[part], fetch)
            _aggregate(lib, out, part, q_rows[part], *select_matches(lib, spec, q_rows[part], scores, rows)[:2])
        return pd.DataFrame({"date": q_dates, "asset": lib.meta["symbol"].to_numpy()[q_rows], **out})[FACTOR_COLUMNS]
    avail, avail_dates = lib.availability()
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
        _aggregate(lib, out, slice(a, b), group, *select_matches(lib, spec, group, scores, rows)[:2])
    return pd.DataFrame({"date": q_dates, "asset": lib.meta["symbol"].to_numpy()[q_rows], **out})[FACTOR_COLUMNS]


def point_rows(lib: Library, points: pd.DataFrame) -> np.ndarray:
    """The library row of each (date, asset) point, -1 where no window of that asset ends that day (dates read
    as the bars' dates are: calendar day and clock time, any time zone offset dropped)."""
    from mlprep.kline.prices import parse_dates

    key = pd.MultiIndex.from_arrays([lib.meta["symbol"], lib.meta["end_date"]])
    wanted = pd.MultiIndex.from_arrays([points["asset"].astype(str), parse_dates(points["date"])])
    return key.get_indexer(wanted)


def sample_rows(lib: Library, samples, warmup_bars: int, seed: int, points: pd.DataFrame | None = None) -> np.ndarray:
    """Library rows of the sample points: `all` (every window past the warm-up), a count (seeded random
    ones of those), or `points` (date, asset) from a sample file (each must name a window)."""
    from mlprep.rng import rng_for

    eligible = np.flatnonzero(lib.end_pos >= warmup_bars)
    if points is not None:
        rows = point_rows(lib, points)
        return np.unique(rows[rows >= 0])
    if samples == "all":
        return eligible
    count = min(int(samples), len(eligible))
    return np.sort(rng_for(seed, "kline-samples").choice(eligible, count, replace=False))
