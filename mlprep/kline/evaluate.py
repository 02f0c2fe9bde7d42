"""Is the factor worth anything? Its rank correlation with what happened next, against random matches.

  IC          Spearman correlation between win_rate and the sample's realised forward return (the window's
              own fwd_return, known only after the date: used here, never by the factor). Pooled over all
              samples with its t-stat, and per date (dates with at least `min_assets` samples) with the
              mean, its t-stat and the share of positive dates.
  quantiles   mean realised return per quantile of win_rate.
  baseline    the same for a factor built from as many random matches per sample, drawn from the windows
              known at its date (so also free of look-ahead): what the similarity search adds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(stats.spearmanr(x[ok], y[ok]).statistic)


def ic_summary(frame: pd.DataFrame, column: str, min_assets: int, quantiles: int) -> dict:
    """IC figures of `column` against `realised` (frame: date, asset, column, realised)."""
    data = frame[np.isfinite(frame[column]) & np.isfinite(frame["realised"])]
    pooled = spearman(data[column].to_numpy(), data["realised"].to_numpy())
    n = len(data)
    t_pooled = pooled * np.sqrt((n - 2) / max(1e-12, 1 - pooled**2)) if n > 2 and np.isfinite(pooled) else None
    per_date = data.groupby("date").filter(lambda g: len(g) >= min_assets).groupby("date").apply(
        lambda g: spearman(g[column].to_numpy(), g["realised"].to_numpy()), include_groups=False).dropna()
    mean_ic = float(per_date.mean()) if len(per_date) else None
    t_dates = (float(per_date.mean() / per_date.std(ddof=1) * np.sqrt(len(per_date)))
               if len(per_date) > 2 and per_date.std(ddof=1) > 0 else None)
    result = {"samples": int(n), "ic": None if not np.isfinite(pooled) else round(pooled, 6),
              "ic_t_stat": None if t_pooled is None else round(float(t_pooled), 4),
              "dates_with_ic": int(len(per_date)), "mean_daily_ic": None if mean_ic is None else round(mean_ic, 6),
              "daily_ic_t_stat": None if t_dates is None else round(t_dates, 4),
              "positive_ic_share": None if not len(per_date) else round(float((per_date > 0).mean()), 4)}
    if n >= quantiles and data[column].nunique() > 1:
        bins = pd.qcut(data[column].rank(method="first"), quantiles, labels=False) + 1
        result["quantile_mean_return"] = {int(q): round(float(v), 6) for q, v in
                                          data.groupby(bins)["realised"].mean().items()}
    return result, per_date


def random_baseline(known_dates: np.ndarray, fwd_known: np.ndarray, dates: np.ndarray, n_matches: np.ndarray,
                    seed: int) -> np.ndarray:
    """Win rate of `n_matches` random windows known at each date (`known_dates` sorted, `fwd_known` their
    forward returns), drawn with replacement, seeded."""
    from mlprep.rng import rng_for

    rng = rng_for(seed, "kline-baseline")
    available = np.searchsorted(known_dates, dates, side="right")
    width = int(n_matches.max()) if len(n_matches) else 0
    picks = (rng.random((len(dates), max(width, 1))) * np.maximum(available, 1)[:, None]).astype(np.int64)
    used = (np.arange(max(width, 1))[None, :] < n_matches[:, None]) & (available[:, None] > 0)
    wins = np.where(used, fwd_known[np.minimum(picks, len(fwd_known) - 1)] > 0, False).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(used.sum(axis=1) > 0, wins / used.sum(axis=1), np.nan)


def plot(frame: pd.DataFrame, per_date: pd.Series, result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, label in (("factor", "similarity factor"), ("baseline", "random matches")):
        q = result[name].get("quantile_mean_return") or {}
        offset = -0.2 if name == "factor" else 0.2
        axes[0].bar(np.array(list(q), dtype=float) + offset, list(q.values()), width=0.4, label=label)
    axes[0].set(title="mean realised return by win-rate quantile", xlabel="quantile (1 = lowest win rate)")
    axes[0].axhline(0, color="black", linewidth=0.6)
    axes[0].legend()
    if len(per_date):
        cumulative = per_date.sort_index().cumsum()
        axes[1].plot(cumulative.index, cumulative.to_numpy())
    axes[1].set(title=f"cumulative daily IC (mean {result['factor'].get('mean_daily_ic')})", xlabel="date")
    data = frame[np.isfinite(frame["factor"]) & np.isfinite(frame["realised"])]
    axes[2].scatter(data["factor"], data["realised"], s=4, alpha=0.4)
    axes[2].set(title=f"win rate vs realised return (IC {result['factor'].get('ic')})", xlabel="win rate",
                ylabel="realised forward return")
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
