"""kline_factor: price files, windows, the no-look-ahead factor, evaluation, the workflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_snakemake

from mlprep.config import only
from mlprep.failures import REASON_CODES, ItemError
from mlprep.kline.library import WindowSpec, price_embedding, symbol_windows
from mlprep.kline.prices import read_bars
from mlprep.kline.search import Library, SearchSpec, factor_for, sample_rows

DEMO = REPO / "resources" / "demo" / "prices"


def _bars(n: int = 40, seed: int = 0) -> pd.DataFrame:
    from mlprep.demo import price_series

    return price_series(n, seed, plants=0)


# ---------------------------------------------------------------- reading


def test_column_spellings_adjusted_close_and_sorting(tmp_path):
    frame = _bars()
    yahoo = frame.rename(columns=str.title).assign(**{"Adj Close": frame["close"] * 0.5})
    yahoo.iloc[::-1].to_csv(tmp_path / "Y.csv", index=False)  # newest first, as some vendors write
    bars = read_bars("Y", str(tmp_path / "Y.csv"), 10).frame
    assert bars["date"].is_monotonic_increasing and len(bars) == 40
    np.testing.assert_allclose(bars["close"], frame["close"] * 0.5, rtol=1e-12)
    np.testing.assert_allclose(bars["open"], frame["open"] * 0.5, rtol=1e-12)  # scaled like the close
    raw = read_bars("Y", str(tmp_path / "Y.csv"), 10, adjusted=False).frame
    np.testing.assert_allclose(raw["close"], frame["close"], rtol=1e-12)
    frame.rename(columns={"date": "timestamp"}).to_parquet(tmp_path / "T.parquet")
    assert len(read_bars("T", str(tmp_path / "T.parquet"), 10).frame) == 40


def test_akshare_headers_in_gbk_or_utf8_with_a_bom_read_as_the_english_ones(tmp_path):
    """AKShare writes Chinese headers (日期, 开盘, 收盘, 最高, 最低, 成交量, and columns the factor does not use), and Excel
    on Chinese Windows saves CSV as GBK: both were refused (missing_column, unreadable_table)."""
    frame = _bars()
    english = read_bars("E", (frame.to_csv(tmp_path / "E.csv", index=False), str(tmp_path / "E.csv"))[1], 10).frame
    akshare = frame.rename(columns={"date": "日期", "open": "开盘", "close": "收盘", "high": "最高", "low": "最低",
                                    "volume": "成交量"}).assign(**{"股票代码": "000001", "涨跌幅": 0.1})
    for name, encoding in (("gbk.csv", "gbk"), ("bom.csv", "utf_8_sig")):
        akshare.iloc[::-1].to_csv(tmp_path / name, index=False, encoding=encoding)
        pd.testing.assert_frame_equal(read_bars("A", str(tmp_path / name), 10).frame, english)


def test_bad_rows_become_failures_and_bad_files_raise_with_their_code(tmp_path):
    frame = _bars().astype({"open": object, "close": object})
    frame.loc[3, "close"] = "n/a"
    frame.loc[5, "open"] = 0
    frame.loc[7, "close"] = -1.0
    frame.loc[9, "high"] = frame.loc[9, "low"] / 2
    frame["date"] = frame["date"].astype(str)
    frame.loc[11, "date"] = "not a date"
    frame.loc[13, "date"] = frame.loc[12, "date"]
    frame.to_csv(tmp_path / "B.csv", index=False)
    bars = read_bars("B", str(tmp_path / "B.csv"), 10)
    codes = {f.item_id: f.reason_code for f in bars.failures}
    assert codes == {"B@row5": "bad_value", "B@row7": "bad_value", "B@row9": "bad_value", "B@row11": "bad_value",
                     "B@row13": "bad_date", "B@row15": "duplicate_date"}
    assert len(bars.frame) == 34 and bars.frame["date"].is_unique
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("date,open,high,low,close\n")
    _bars().drop(columns=["low"]).to_csv(tmp_path / "nolow.csv", index=False)
    _bars(8).to_csv(tmp_path / "short.csv", index=False)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    for name, code in [("empty.csv", "empty_file"), ("header.csv", "empty_file"), ("nolow.csv", "missing_column"),
                       ("short.csv", "too_few_bars"), ("junk.parquet", "unreadable_table")]:
        with pytest.raises(ItemError) as err:
            read_bars("X", str(tmp_path / name), 10)
        assert err.value.code == code and code in REASON_CODES, name


def test_without_continue_on_error_a_bad_file_stops_the_shard_naming_it(tmp_path):
    from mlprep.failures import ItemFailedError
    from mlprep.kline.catalog import LIST_COLUMNS, sync_lists
    from mlprep.kline.library import build_shard
    from mlprep.shardlists import ShardLists

    prices = tmp_path / "prices"
    prices.mkdir()
    _bars(60).to_csv(prices / "GOOD.csv", index=False)
    (prices / "BAD.csv").write_text("date,open\n2020-01-01,1\n")
    cfg = {"prices_dir": str(prices), "window": 10, "stride": 1, "horizon": 2, "channels": [], "embedding": "price"}
    lists = ShardLists(tmp_path / "lists", ["000-of-001"], LIST_COLUMNS)
    sync_lists(cfg, lists)
    with pytest.raises(ItemFailedError, match="BAD.csv"):
        build_shard("000-of-001", lists.path("000-of-001"), cfg, False, tmp_path / "shard")
    assert not (tmp_path / "shard").exists()  # no partial folder under the final name
    stats = build_shard("000-of-001", lists.path("000-of-001"), cfg, True, tmp_path / "shard")
    assert stats["items_ok"] == 1 and stats["items_failed"] == 1


# ---------------------------------------------------------------- windows


def test_windows_know_their_outcome_only_after_the_horizon():
    bars = _bars(30)
    spec = WindowSpec(window=10, stride=3, horizon=4)
    meta, closes = symbol_windows("S", bars, spec)
    assert meta["end_pos"].tolist() == [9, 12, 15, 18, 21, 24, 27]
    close = bars["close"].to_numpy()
    assert meta["fwd_return"].iloc[0] == pytest.approx(close[13] / close[9] - 1)
    assert meta["known_date"].iloc[0] == bars["date"].iloc[13]
    assert meta["known_date"].isna().tolist() == [False] * 6 + [True] and meta["fwd_return"].isna().sum() == 1
    np.testing.assert_array_equal(closes[1], close[3:13].astype(np.float32))
    vectors = price_embedding(bars, meta["end_pos"].to_numpy(), spec)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    # inner product of two price embeddings = Pearson correlation of the closes
    assert float(vectors[0] @ vectors[3]) == pytest.approx(np.corrcoef(closes[0], closes[3])[0, 1], abs=1e-5)
    # a longer file keeps its earlier windows bit for bit
    longer = symbol_windows("S", _bars(60), spec)[0]
    pd.testing.assert_frame_equal(longer.iloc[:5], meta.iloc[:5])


def test_charts_draw_bodies_and_wicks_in_the_right_places():
    from mlprep.kline.chart import DOWN, UP, render

    opens = np.array([[10.0, 12.0]])
    closes = np.array([[12.0, 11.0]])  # bar 0 rises, bar 1 falls
    highs, lows = np.array([[13.0, 12.5]]), np.array([[9.0, 10.5]])
    image = render(opens, highs, lows, closes, size=41)[0]  # 20 px per bar, 10 px per price unit
    assert image.shape == (41, 41, 3) and image.dtype == np.uint8
    assert (image[10:31, 2] == UP).all() and (image[:10, 2] == 255).all()  # body: 12 -> 10 is rows 10..30
    assert (image[0:41, 10] == UP).all()  # the wick, 13 -> 9, is the whole height in the band's middle column
    assert (image[10:21, 22] == DOWN).all() and (image[21:, 22] == 255).all()  # falling body 12 -> 11
    assert (image[5:26, 30] == DOWN).all() and (image[26:, 30] == 255).all()  # its wick 12.5 -> 10.5
    assert (image[:, 40] == 255).all()  # the column after the last band stays blank


def test_chart_embeddings_through_the_clip_encoder(tmp_path, tiny_clip):
    from mlprep.kline.library import build_shard
    from mlprep.shardlists import ShardLists

    prices = tmp_path / "prices"
    prices.mkdir()
    _bars(60, 1).to_csv(prices / "A.csv", index=False)
    lists = ShardLists(tmp_path / "lists", ["000-of-001"], ["symbol", "path", "size", "mtime_ns"])
    from mlprep.kline.catalog import sync_lists

    cfg = {"prices_dir": str(prices), "window": 20, "stride": 5, "horizon": 5, "channels": [], "embedding": "chart",
           "chart": {"size": 40, "batch_size": 4, "model": tiny_clip}}
    sync_lists(cfg, lists)
    stats = build_shard("000-of-001", lists.path("000-of-001"), cfg, True, tmp_path / "shard", seed=1)
    vectors = np.load(tmp_path / "shard" / "embeddings.npy")
    assert stats["windows"] == 9 and vectors.shape == (9, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5) and np.abs(vectors[0] - vectors[1]).max() > 1e-4


# ---------------------------------------------------------------- the factor


def _library(frames: dict[str, pd.DataFrame], spec: WindowSpec) -> Library:
    metas, vectors, closes = [], [], []
    for symbol, bars in sorted(frames.items()):
        meta, window_closes = symbol_windows(symbol, bars, spec)
        metas.append(meta)
        closes.append(window_closes)
        vectors.append(price_embedding(bars, meta["end_pos"].to_numpy(), spec))
    return Library(pd.concat(metas, ignore_index=True), np.concatenate(vectors), np.concatenate(closes))


@pytest.mark.parametrize("rerank", ["none", "corr", "dtw"])
def test_no_look_ahead_truncated_data_give_the_same_factor(rerank):
    from mlprep.demo import price_series

    spec = WindowSpec(window=12, stride=1, horizon=3)
    search = SearchSpec(12, 1, 3, search_k=40, top_k=5, rerank=rerank, max_price_checks=12)
    full = {f"S{k}": price_series(160, 100 + k, plants=3) for k in range(6)}
    cutoff = full["S0"]["date"].iloc[100]
    truncated = {s: f[f["date"] <= cutoff].reset_index(drop=True) for s, f in full.items()}
    factors = {}
    for name, frames in (("full", full), ("truncated", truncated)):
        lib = _library(frames, spec)
        rows = sample_rows(lib, "all", 20, seed=0)
        factors[name] = factor_for(lib, rows, faiss.IndexFlatIP(lib.vectors.shape[1]), search)
    full_part = factors["full"][factors["full"]["date"] <= cutoff].reset_index(drop=True)
    assert len(full_part) == len(factors["truncated"]) > 300
    assert (full_part["n_matches"] > 0).mean() > 0.9
    pd.testing.assert_frame_equal(full_part, factors["truncated"], rtol=1e-9, atol=1e-12)
    # and the later data did change later factors: the test is not vacuous
    assert (factors["full"]["date"] > cutoff).sum() > 100


@pytest.mark.parametrize("rerank", ["none", "corr"])
def test_deep_batched_search_gives_the_walks_factor(rerank):
    from mlprep.demo import price_series

    spec = WindowSpec(window=12, stride=1, horizon=3)
    search = SearchSpec(12, 1, 3, search_k=40, top_k=5, rerank=rerank, max_price_checks=12)
    lib = _library({f"S{k}": price_series(300, 200 + k, plants=4) for k in range(6)}, spec)
    rows = sample_rows(lib, 150, 20, seed=3)  # thinly spread: ~1 point per date
    full = faiss.IndexFlatIP(lib.vectors.shape[1])
    full.add(lib.vectors)
    walked = factor_for(lib, rows, faiss.IndexFlatIP(lib.vectors.shape[1]), search)
    batched = factor_for(lib, rows, faiss.IndexFlatIP(lib.vectors.shape[1]), search, full_index=full)
    assert (walked["n_matches"] == 5).mean() > 0.9
    pd.testing.assert_frame_equal(batched, walked, rtol=1e-5, atol=1e-6)
    # both ways of finding a point's known windows agree: from the ranking, or scored directly
    from mlprep.kline.search import known_hits

    direct = known_hits(lib, full, rows, 49, first_depth=1)  # the ranking never suffices: all scored directly
    ranked = known_hits(lib, full, rows, 49, first_depth=full.ntotal)  # the whole ranking: none directly
    np.testing.assert_array_equal(direct[1], ranked[1])
    np.testing.assert_allclose(direct[0], ranked[0], rtol=1e-5)


def test_matches_are_known_at_the_date_and_never_overlap_their_own_window():
    from mlprep.demo import price_series
    from mlprep.kline.search import select_matches

    spec = WindowSpec(window=10, stride=1, horizon=2)
    lib = _library({f"S{k}": price_series(120, 7 + k, plants=2) for k in range(3)}, spec)
    search = SearchSpec(10, 1, 2, search_k=30, top_k=8)
    avail, dates = lib.availability()
    q = np.flatnonzero((lib.meta["symbol"] == "S1").to_numpy() & (lib.end_pos == 80))
    known = avail[: np.searchsorted(dates, lib.end_date[q[0]], side="right")]
    index = faiss.IndexFlatIP(lib.vectors.shape[1])
    index.add(lib.vectors[known])
    scores, ids = index.search(lib.vectors[q], 30 + search.overlap_room)
    chosen, rows, _ = select_matches(lib, search, q, scores, known[ids])
    picked = rows[chosen]
    assert len(picked) == 8
    assert (lib.known_date[picked] <= lib.end_date[q[0]]).all()
    same = lib.symbol_code[picked] == lib.symbol_code[q[0]]
    assert not (same & (lib.end_pos[picked] > 80 - 10)).any()


# ---------------------------------------------------------------- the workflow


def _kline_config(work: Path, **factor) -> dict:
    return {"device": "cpu", **only("kline_factor"),
            "kline_factor": {"prices_dir": str(work / "prices"), "shards": 3,
                             "factor": {"samples": 200, "search_k": 100, "warmup_bars": 40, **factor}}}


def test_kline_workflow_outputs_failures_and_one_shard_rerun_per_changed_symbol(tmp_path):
    work = tmp_path / "flow"
    from mlprep.demo import write_prices_demo

    write_prices_demo(work / "prices", n_symbols=8, n_bars=200)
    hostile = "株式 ; rm -rf $(x) @row1 " + "y" * 150  # "@row": how a dropped row is named
    shutil.copy(work / "prices" / "S002.csv", work / "prices" / f"{hostile}.csv")
    (work / "prices" / "empty.csv").write_text("")
    bad = pd.read_csv(work / "prices" / "S003.csv")
    bad.loc[10, "close"] = -5
    bad.to_csv(work / "prices" / "S003.csv", index=False)
    config = _kline_config(work)
    config["kline_factor"]["index"] = {"factory": "IVF4,Flat", "search_params": "nprobe=4"}  # all lists: exact
    before = set(tmp_path.rglob("*"))
    run_snakemake(work, config)
    made = [p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()]
    assert [p for p in made if not p.is_relative_to(work / "results") and not p.is_relative_to(work / ".snakemake")
            and p != work / "config.yaml"] == []
    out = work / "results" / "kline_factor"
    assert json.loads((out / "summary.json").read_text())["recall_at_10"] > 0.99  # ties: the copied file
    factor = pd.read_parquet(out / "factor.parquet")
    assert list(factor.columns) == ["date", "asset", "win_rate", "mean_fwd_return", "n_matches", "mean_similarity"]
    assert len(factor) == 200 and factor["n_matches"].max() == 10 and hostile in set(
        pd.read_parquet(out / "library.parquet")["symbol"])
    failures = pd.read_parquet(out / "failures.parquet").set_index("item_id")["reason_code"].to_dict()
    assert failures == {"empty": "empty_file", "S003@row12": "bad_value"}
    copies = pd.read_parquet(out / "series_checks.parquet")  # the copied file is one history with S002
    assert copies[["symbol_a", "symbol_b"]].values.tolist() == [["S002", hostile]], copies
    assert json.loads((out / "summary.json").read_text())["near_identical_pairs"] == 1
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["factor"]["samples"] > 150 and "quantile_mean_return" in evaluation["baseline"]
    assert (out / "eval.png").stat().st_size > 10_000
    # new bars for one symbol: only its shard's library job runs again
    grown = pd.read_csv(work / "prices" / "S006.csv")
    extra = grown.iloc[-5:].copy()
    extra["date"] = pd.bdate_range(pd.Timestamp(grown["date"].iloc[-1]) + pd.Timedelta(days=1), periods=5)
    pd.concat([grown, extra]).to_csv(work / "prices" / "S006.csv", index=False)
    dry = run_snakemake(work, config, "-n")
    assert dry.stdout.count("rule kline_library_shard:") == 1, dry.stdout[-3000:]


def test_timezone_aware_daily_bars_keep_their_date_and_unmatched_samples_are_failures(tmp_path):
    """Found on real data: yfinance's dates (`2018-06-01 00:00:00-04:00`) became UTC clock times, so a sample
    file of calendar dates matched nothing and the run ended 0 with an empty factor."""
    from mlprep.demo import write_prices_demo

    work = tmp_path / "flow"
    write_prices_demo(work / "prices", n_symbols=6, n_bars=200)
    for path in (work / "prices").glob("*"):
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        column = next(c for c in frame.columns if c.lower() in ("date", "timestamp"))
        local = pd.to_datetime(frame[column]).dt.tz_localize("America/New_York")
        frame = frame.drop(columns=[column]).assign(Date=local.dt.strftime("%Y-%m-%d %H:%M:%S%z").str.replace(
            r"(\d\d)(\d\d)$", r"\1:\2", regex=True))
        path.unlink()
        frame.to_csv(path.with_suffix(".csv"), index=False)
    assert "-04:00" in (work / "prices" / "S000.csv").read_text() and "-05:00" in (work / "prices" / "S000.csv").read_text()
    dates = pd.to_datetime(pd.read_csv(work / "prices" / "S001.csv")["Date"].str[:10])
    points = pd.DataFrame({"date": [d.strftime("%Y-%m-%d") for d in dates[60:90]] + ["1990-01-02", "2018-06-01"],
                           "asset": ["S001"] * 30 + ["S001", "NOPE"]})
    points.to_csv(work / "points.csv", index=False)
    config = _kline_config(work, sample_file=str(work / "points.csv"))
    run_snakemake(work, config)
    out = work / "results" / "kline_factor"
    factor = pd.read_parquet(out / "factor.parquet")
    assert len(factor) == 30 and set(factor["date"]) == set(dates[60:90])  # calendar days, not UTC clock times
    failures = pd.read_parquet(out / "factor_failures.parquet")
    assert failures["item_id"].tolist() == ["points.csv@row32", "points.csv@row33"]
    assert set(failures["reason_code"]) == {"unknown_point"} and "NOPE" in failures["reason"].iloc[1]
    # no sample row names a window: the factor is empty, and the run fails saying why
    points.iloc[30:].to_csv(work / "points.csv", index=False)
    done = run_snakemake(work, config, check=False)
    assert done.returncode != 0
    assert "none of the 2 rows of" in done.stdout + done.stderr and "line 2" in done.stdout + done.stderr


def test_the_batched_search_gives_the_same_factor_on_truncated_data_bit_for_bit():
    """The deep batched search (thinly spread sample points) found the same matches on full and truncated data,
    but their mean similarity differed by ~1e-7 (float32 scores of differently shaped searches)."""
    from mlprep.demo import price_series

    spec = WindowSpec(window=12, stride=1, horizon=3)
    search = SearchSpec(12, 1, 3, search_k=40, top_k=5)
    full = {f"S{k}": price_series(400, 300 + k, plants=3) for k in range(8)}
    cutoff = full["S0"]["date"].iloc[300]
    truncated = {s: f[f["date"] <= cutoff].reset_index(drop=True) for s, f in full.items()}
    factors = {}
    for name, frames in (("full", full), ("truncated", truncated)):
        lib = _library(frames, spec)
        keep = lib.end_date <= np.datetime64(cutoff)
        rows = sample_rows(lib, "all", 20, seed=0)
        rows = rows[keep[rows]][::7]  # thinly spread: the batched path
        index = faiss.IndexFlatIP(lib.vectors.shape[1])
        full_index = faiss.IndexIDMap(faiss.IndexFlatIP(lib.vectors.shape[1]))
        full_index.add_with_ids(lib.vectors, np.arange(len(lib.vectors)))
        factors[name] = factor_for(lib, rows, index, search, full_index=full_index)
    assert len(factors["full"]) == len(factors["truncated"]) > 100
    pd.testing.assert_frame_equal(factors["full"], factors["truncated"], check_exact=True)


def test_near_identical_histories_are_flagged_and_a_match_from_them_counts_once(tmp_path):
    """Found on real data: with GOOG.csv, GOOG_DIRTY.csv and DUPDATES.csv (copies of one series) in the folder,
    every match from that history appeared once per copy in the win rate."""
    from mlprep.demo import price_series
    from mlprep.kline.duplicates import histories, near_identical
    from mlprep.kline.search import select_matches

    spec = WindowSpec(window=10, stride=1, horizon=2)
    base = price_series(160, 11, plants=3)
    rng = np.random.default_rng(0)
    dirty = base.copy()
    for column in ("open", "high", "low", "close"):
        dirty[column] = dirty[column] * (1 + 1e-4 * rng.standard_normal(len(dirty)))
    dirty = dirty.drop(index=[40, 41, 90]).reset_index(drop=True)  # and a few bars lost
    frames = {"GOOG": base, "GOOG_DIRTY": dirty, "DUPDATES": base.copy(),
              **{f"S{k}": price_series(160, 30 + k, plants=3) for k in range(4)}}
    lib = _library(frames, spec)
    pairs = near_identical(lib.meta, lib.vectors, lib.closes, min_common=20)
    assert {(a, b) for a, b in zip(pairs["symbol_a"], pairs["symbol_b"])} == {
        ("DUPDATES", "GOOG"), ("DUPDATES", "GOOG_DIRTY"), ("GOOG", "GOOG_DIRTY")}, pairs
    assert (pairs["return_corr"] > 0.98).all() and (pairs["common_bars"] >= 140).all()
    same = histories(pairs)
    assert same == {"GOOG": "DUPDATES", "GOOG_DIRTY": "DUPDATES", "DUPDATES": "DUPDATES"}

    search = SearchSpec(10, 1, 2, search_k=60, top_k=10)
    deduped = Library(lib.meta, lib.vectors, lib.closes, same)
    q = np.flatnonzero((lib.meta["symbol"] == "S1").to_numpy() & (lib.end_pos == 150))
    index = faiss.IndexFlatIP(lib.vectors.shape[1])
    avail, dates = lib.availability()
    known = avail[: np.searchsorted(dates, lib.end_date[q[0]], side="right")]
    index.add(lib.vectors[known])
    scores, ids = index.search(lib.vectors[q], 60 + search.overlap_room)
    per_copy = []
    for library in (lib, deduped):
        chosen, rows, _ = select_matches(library, search, q, scores, known[ids])
        picked = rows[chosen]
        copies = library.meta.iloc[picked]
        history = copies["symbol"].map(lambda s: same.get(s, s))
        per_copy.append(pd.DataFrame({"history": history, "date": copies["end_date"]}).duplicated().sum())
    assert per_copy[0] > 0  # without the check, one history's window is counted once per copy
    assert per_copy[1] == 0
    # a query in one copy never takes another copy's window over the same days as a match
    q = np.flatnonzero((lib.meta["symbol"] == "GOOG").to_numpy() & (lib.end_pos == 150))
    scores, ids = index.search(lib.vectors[q], 60 + search.overlap_room)
    chosen, rows, _ = select_matches(deduped, search, q, scores, known[ids])
    picked = rows[chosen]
    start = deduped.start_date[q[0]]
    assert not ((deduped.history_code[picked] == deduped.history_code[q[0]])
                & (deduped.end_date[picked] >= start)).any()
    # unrelated random walks are never flagged
    assert near_identical(*(lambda l: (l.meta, l.vectors, l.closes))(
        _library({f"S{k}": price_series(160, 30 + k, plants=3) for k in range(6)}, spec)), min_common=20).empty
