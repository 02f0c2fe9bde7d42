"""Benchmark of kline_factor, measured side by side in one run (`make bench`).

  library          price files -> windows + price embeddings (the library shard job), windows/s
  chart rendering  candlestick charts of the same windows, in memory, before any model, windows/s
  factor           `--samples` sample points against the library (exact index, no look-ahead: the deep
                   batched search the workflow uses for thinly spread points)
  seed-style loop  what the seed script does per sample: draw the chart, write and read back a PNG, encode
                   it alone with CLIP (ViT-B-32, this run's precision), search alone; on `--seed-samples` of
                   the samples, extrapolated per sample
  chart factor     the factor step on chart embeddings (512-d): its cost is the search's, which depends
                   only on the library's size and dimension, so random unit vectors stand in for the
                   charts (encoding 200k charts with ViT-B-32 on 2 CPU cores takes hours)
  all panel        `--panel-symbols` x `--panel-bars` synthetic bars, every symbol on every date, with
                   an IVF index (recall@10 against exact search reported), wall time
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from mlprep.demo import price_series
from mlprep.devices import cpu_summary, precision_name, select_precision
from mlprep.indexing import build_index, recall_at_k
from mlprep.kline.catalog import LIST_COLUMNS, sync_lists
from mlprep.kline.chart import render_windows
from mlprep.kline.library import build_shard
from mlprep.kline.search import Library, SearchSpec, factor_for, sample_rows
from mlprep.rng import rng_for
from mlprep.shardlists import ShardLists

REPO = Path(__file__).resolve().parents[1]
QUIET = open(os.devnull, "w")  # noqa: SIM115 - the progress bars' sink for the whole run


def write_prices(folder: Path, symbols: int, bars: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(symbols):
        price_series(bars, 5000 + k, plants=6).to_parquet(folder / f"B{k:04d}.parquet", index=False)


def build_library(prices: Path, work: Path, cfg: dict) -> tuple[Library, float]:
    lists = ShardLists(work / "lists", ["000-of-001"], LIST_COLUMNS)
    sync_lists(cfg, lists)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        build_shard("000-of-001", lists.path("000-of-001"), cfg, True, work / "shard", progress=quiet)
    seconds = time.perf_counter() - started
    lib = Library(pd.read_parquet(work / "shard" / "windows.parquet"), np.load(work / "shard" / "embeddings.npy"),
                  np.load(work / "shard" / "closes.npy"))
    return lib, seconds


def seed_style(lib: Library, bars_of: dict, rows: np.ndarray, index: faiss.Index, spec: SearchSpec, encoder,
               size: int) -> float:
    """Seconds per sample for the seed's loop: chart -> PNG file -> decode -> CLIP alone -> search alone."""
    import torch
    from PIL import Image

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            symbol, end = lib.meta["symbol"].iat[row], int(lib.end_pos[row])
            chart = render_windows(bars_of[symbol], np.array([end]), spec.window, size)[0]
            path = Path(tmp) / f"sample_{row}.png"
            Image.fromarray(chart).resize((224, 224), Image.NEAREST).save(path)
            pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
            vector = encoder.encode_images(pixels.contiguous())
            index.search(vector, spec.search_k)
            os.remove(path)
    return (time.perf_counter() - started) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=100, help="symbols of the library (x --bars windows)")
    parser.add_argument("--bars", type=int, default=2100)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--seed-samples", type=int, default=60)
    parser.add_argument("--panel-symbols", type=int, default=500)
    parser.add_argument("--panel-bars", type=int, default=2500)
    parser.add_argument("--panel-index", default="IVF2048,Flat")
    parser.add_argument("--panel-params", default="nprobe=48")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip-panel", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch

    from mlprep.encoders import ClipEncoder, ModelSpec

    dtype = select_precision(args.precision, torch.device("cpu"))
    print(f"kline_factor benchmark on {cpu_summary()}, {torch.get_num_threads()} threads, CLIP at "
          f"{precision_name(dtype)}")
    figures: dict = {}
    spec = SearchSpec(20, 1, 5, search_k=300, top_k=10)
    cfg = {"window": 20, "stride": 1, "horizon": 5, "channels": [], "embedding": "price", "adjusted": True}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_prices(work / "prices", args.symbols, args.bars)
        lib, seconds = build_library(work / "prices", work, {**cfg, "prices_dir": str(work / "prices")})
        figures["library_windows_per_s"] = len(lib.meta) / seconds
        print(f"library: {len(lib.meta):,} windows of {args.symbols} symbols in {seconds:.2f} s -> "
              f"{len(lib.meta) / seconds:,.0f} windows/s (read, validate, window, embed, write)")
        bars_of = {f"B{k:04d}": price_series(args.bars, 5000 + k, plants=6) for k in range(args.symbols)}
        started = time.perf_counter()
        rendered = 0
        for symbol, bars in bars_of.items():
            rendered += len(render_windows(bars, np.arange(19, len(bars)), 20, 64))
        render_s = time.perf_counter() - started
        figures["chart_windows_per_s"] = rendered / render_s
        print(f"chart rendering: {rendered:,} charts of 64x64 in {render_s:.2f} s -> {rendered / render_s:,.0f} "
              "windows/s")

        rows = sample_rows(lib, args.samples, 60, seed=0)
        price_index = full_index(lib.vectors)
        started = time.perf_counter()
        factor = factor_for(lib, rows, faiss.IndexFlatIP(lib.vectors.shape[1]), spec, QUIET, price_index)
        factor_s = time.perf_counter() - started
        print(f"factor (price embeddings, exact): {len(rows)} samples against {len(lib.meta):,} windows in "
              f"{factor_s:.2f} s ({factor['n_matches'].mean():.1f} matches each)")
        chart_lib = Library(lib.meta, _random_units(len(lib.meta), 512), lib.closes)
        chart_index = full_index(chart_lib.vectors)
        started = time.perf_counter()
        factor_for(chart_lib, rows, faiss.IndexFlatIP(512), spec, QUIET, chart_index)
        chart_factor_s = time.perf_counter() - started
        print(f"factor (512-d chart embeddings, exact): {chart_factor_s:.2f} s")

        encoder = ClipEncoder(ModelSpec("ViT-B-32"), torch.device("cpu"), dtype, batch_size=1)
        seed_index = faiss.IndexFlatIP(encoder.dim)
        seed_index.add(chart_lib.vectors)
        picked = rows[np.sort(rng_for(0, "bench-seed").choice(len(rows), min(args.seed_samples, len(rows)),
                                                            replace=False))]
        per_sample = seed_style(lib, bars_of, picked, seed_index, spec, encoder, 64)
        seed_s = per_sample * len(rows)
        print(f"seed-style loop: {per_sample * 1000:.0f} ms per sample -> {seed_s:.1f} s for {len(rows)} samples")
        print(f"  speed-up: price factor x{seed_s / factor_s:.1f}, chart factor x{seed_s / chart_factor_s:.1f}")
        figures.update(factor_s=factor_s, chart_factor_s=chart_factor_s, seed_s=seed_s, samples=len(rows),
                       library_windows=len(lib.meta))

    if not args.skip_panel:
        panel(args, cfg, spec, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def full_index(vectors: np.ndarray) -> faiss.Index:
    """The gather's index: every window, id = library row (built outside the timing, as in the workflow)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def _random_units(n: int, dim: int) -> np.ndarray:
    vectors = rng_for(0, "bench-chart").standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def panel(args, cfg: dict, spec: SearchSpec, figures: dict) -> None:
    """Every symbol on every date, IVF index: build, recall, factor."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_prices(work / "prices", args.panel_symbols, args.panel_bars)
        started = time.perf_counter()
        lib, library_s = build_library(work / "prices", work, {**cfg, "prices_dir": str(work / "prices")})
        index = build_index(lib.vectors, args.panel_index, 0, 100_000)
        faiss.ParameterSpace().set_index_parameters(index, args.panel_params)
        queries = lib.vectors[np.sort(rng_for(0, "bench-recall").choice(len(lib.vectors), 1000, replace=False))]
        recall = recall_at_k(index, lib.vectors, queries, 10)
        index.reset()
        rows = sample_rows(lib, "all", 60, seed=0)
        factor_started = time.perf_counter()
        factor = factor_for(lib, rows, index, spec, QUIET)
        factor_s = time.perf_counter() - factor_started
        total = time.perf_counter() - started
    print(f"all panel: {args.panel_symbols} symbols x {args.panel_bars} bars = {len(lib.meta):,} windows, "
          f"{len(rows):,} sample points, {args.panel_index} ({args.panel_params}) recall@10 {recall:.3f}")
    print(f"  library {library_s:.1f} s, factor {factor_s:.1f} s, total {total:.1f} s "
          f"({factor['n_matches'].mean():.1f} matches per point)")
    figures["panel"] = {"windows": len(lib.meta), "points": len(rows), "recall_at_10": recall,
                        "library_s": library_s, "factor_s": factor_s, "total_s": total}


if __name__ == "__main__":
    main()
