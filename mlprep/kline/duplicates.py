"""Near-identical price histories: one series filed under several names (`GOOG.csv`, `GOOG_DIRTY.csv`, a copy
with repeated dates, share classes that move as one). Their windows match each other on every date, so without
this check a pattern match from such a history would count once per copy in the win rate.

Candidates come from the windows themselves: on a few sampled dates, windows of two symbols ending that date
whose embeddings are almost equal (cosine >= `cosine`). Only candidate pairs are then compared over their whole
common history: the correlation of their per-bar log returns on the dates both have. The cost grows with the
symbols per sampled date (a matrix product in blocks), never with every pair's full history.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

CHECK = "near_identical_series"
ACTION = "one history: a match from either counts once, and neither matches the other's overlapping windows"


def near_identical(meta: pd.DataFrame, vectors: np.ndarray, closes: np.ndarray, min_common: int,
                   cosine: float = 0.995, corr: float = 0.98, dates: int = 16, block: int = 1024) -> pd.DataFrame:
    """kline.series_checks rows: every pair of symbols whose histories are near-identical, with the evidence."""
    symbols = meta["symbol"].to_numpy(dtype=str)
    ends = meta["end_date"].to_numpy("datetime64[ns]")
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12) if len(vectors) else vectors
    days = np.unique(ends)
    picked = days[np.unique(np.linspace(0, len(days) - 1, min(dates, len(days))).round().astype(int))] \
        if len(days) else days
    hits: Counter = Counter()
    for day in picked:
        rows = np.flatnonzero(ends == day)
        if len(rows) < 2:
            continue
        part = unit[rows].astype(np.float32)
        for start in range(0, len(rows), block):
            sims = part[start : start + block] @ part.T
            a, b = np.nonzero(sims >= cosine)
            keep = b > a + start  # each pair once, never a window with itself
            for i, j in zip(a[keep] + start, b[keep]):
                pair = tuple(sorted((symbols[rows[i]], symbols[rows[j]])))
                if pair[0] != pair[1]:
                    hits[pair] += 1
    last = pd.Series(closes[:, -1].astype(np.float64) if len(closes) else np.zeros(0), index=meta.index)
    series = {}
    out = []
    for (a, b), _ in sorted(hits.items()):
        for s in (a, b):
            if s not in series:
                mask = symbols == s
                series[s] = pd.Series(np.log(np.maximum(last[mask].to_numpy(), 1e-300)), index=ends[mask])
        common = series[a].index.intersection(series[b].index)
        if len(common) < min_common:
            continue
        ra, rb = series[a].diff().reindex(common), series[b].diff().reindex(common)
        ok = ra.notna() & rb.notna()
        if ok.sum() < min_common - 1:
            continue
        r = float(np.corrcoef(ra[ok], rb[ok])[0, 1]) if ra[ok].std() > 0 and rb[ok].std() > 0 else 0.0
        if r >= corr:
            gap = (series[a].reindex(common) - series[b].reindex(common)).to_numpy()
            out.append({"check": CHECK, "symbol_a": a, "symbol_b": b, "common_bars": int(len(common)),
                        "return_corr": r, "log_price_gap": float(np.median(np.abs(gap - np.median(gap)))),
                        "action": ACTION})
    return pd.DataFrame(out, columns=["check", "symbol_a", "symbol_b", "common_bars", "return_corr",
                                      "log_price_gap", "action"])


def histories(pairs: pd.DataFrame) -> dict[str, str]:
    """symbol -> the history it belongs to (the first name, sorted, of its group of near-identical series), for
    the symbols of `pairs`; a symbol in no pair is its own history."""
    parent: dict[str, str] = {}

    def root(s: str) -> str:
        while parent.get(s, s) != s:
            s = parent[s]
        return s

    for a, b in zip(pairs["symbol_a"], pairs["symbol_b"]):
        ra, rb = root(str(a)), root(str(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {s: root(s) for s in {*map(str, pairs["symbol_a"]), *map(str, pairs["symbol_b"])}}
