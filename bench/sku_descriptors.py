"""Benchmark: which global descriptor and which augmentations help shop-floor photos of look-alike products,
measured side by side in one run on the fine-grained catalog of bench/sku_rerank.py.

The catalog (mlprep.demo.write_lookalike_catalog): 48 SKUs cut from the demo's 12 real photos, 2 catalog shots each.
Queries: shop-floor photos of each product (mlprep.sku.shopfloor, a seed of their own), ranked by embeddings alone
against an exact index of the catalog's views (re-ranking is measured by bench/sku_rerank.py; it only reorders the
top candidates these embeddings find). Everything goes through the workflow's own code: the shard job's view plan
and renderer for the index (mlprep.sku.encode.render_items), the search path for the queries
(mlprep.sku.search.embed_images), the packaged EfficientNet-Lite0 with each pooling (mlprep.encoders):
  previous        the defaults before these measurements: average pooling, the centre crop, crops of 50-100%, blur
  descriptors     pooling (model's own average, GeM, multi-scale regional maxima) x query crops (the centre square
                  alone, or averaged with the whole photo), with the default augmentations
  augmentations   the default descriptor with augment_per_image 0 / 5 / 10, the previous defaults, and one setting
                  changed at a time
Each figure is top-1 and top-5 SKU accuracy over two query sets of their own seeds (pooled, and each set's top-1);
one query is 1/192 of a set. The index's size (vectors) says what each augmentation setting costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOLINGS = ("model", "gem", "multiscale")
CROPS = {"centre": ("centre",), "centre + whole": ("centre", "whole")}
DEFAULT_POOLING, DEFAULT_CROPS = "gem", "centre + whole"  # what `auto` and the config's query_crops give


def augment_variants(base) -> dict:
    """The defaults, the previous defaults, and one setting changed at a time (5 views a photo unless named)."""
    return {
        "no augmentation (originals only)": (base, 0),
        "default (5 views)": (base, 5),
        "10 views": (base, 10),
        "previous default (crops 0.5-1, blur 30%)": (replace(base, crop_scale=(0.5, 1.0), blur_prob=0.3), 5),
        "no colour jitter": (replace(base, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0), 5),
        "with blur (30%)": (replace(base, blur_prob=0.3), 5),
        "no rotation or perspective": (replace(base, rotation_deg=0.0, perspective=0.0), 5),
        "no crops (the whole square)": (replace(base, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)), 5),
        "looser crops (0.5-1)": (replace(base, crop_scale=(0.5, 1.0)), 5),
        "stronger perspective (0.3)": (replace(base, perspective=0.3), 5),
        "crops only": (replace(base, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, rotation_deg=0.0,
                               perspective=0.0), 5),
    }


def catalog_items(work: Path):
    from mlprep.demo import write_lookalike_catalog
    from mlprep.sku.catalog import read_catalog

    path = write_lookalike_catalog(work / "data")
    return read_catalog(path, work / "data" / "images", 1).items, json.loads(path.read_text())


def queries_of(skus: list[dict], per_sku: int, seed: int) -> tuple[list[bytes], list[str]]:
    from mlprep.demo import lookalike_queries

    queries = lookalike_queries(skus, per_sku, seed)
    return [data for _, data in queries], [sku for sku, _ in queries]


def accuracy(vectors: np.ndarray, skus: np.ndarray, queries: np.ndarray, truth: list[str]) -> dict:
    from mlprep.sku.evaluate import exact_index
    from mlprep.sku.index import rank_skus

    ranked = rank_skus(exact_index(vectors), skus, queries, 5, fetch=160)
    return {f"top{k}": float(np.mean([t in [s for s, _ in row[:k]] for t, row in zip(truth, ranked)]))
            for k in (1, 5)}


def main() -> None:
    import torch

    from mlprep.devices import cpu_summary
    from mlprep.encoders import ModelSpec, TimmEncoder
    from mlprep.sku.augment import AugmentSettings
    from mlprep.sku.encode import ViewPlan, render_items
    from mlprep.sku.search import embed_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries-per-sku", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 202],
                        help="the query sets' seeds (the index's views use 42); figures per set and pooled")
    parser.add_argument("--parts", nargs="+", choices=("descriptors", "augmentations"),
                        default=["descriptors", "augmentations"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    encoders = {p: TimmEncoder(ModelSpec("tf_efficientnet_lite0", "packaged:efficientnet-lite0", family="timm",
                                         pooling=p), torch.device("cpu"), torch.float32, 32) for p in POOLINGS}
    size = encoders["model"].image_size
    with tempfile.TemporaryDirectory() as tmp:
        items, skus = catalog_items(Path(tmp))
        query_sets = {seed: queries_of(skus, args.queries_per_sku, seed) for seed in args.seeds}
        embedded: dict[tuple, np.ndarray] = {}

        def queries(pooling: str, crops: tuple, seed: int) -> np.ndarray:
            if (pooling, crops, seed) not in embedded:
                vectors, ok, failed = embed_images(encoders[pooling], query_sets[seed][0], crops=crops)
                assert not failed and len(ok) == len(query_sets[seed][0])
                embedded[pooling, crops, seed] = vectors
            return embedded[pooling, crops, seed]

        def measure(index: np.ndarray, labels: np.ndarray, pooling: str, crops: tuple) -> dict:
            per_seed = {seed: accuracy(index, labels, queries(pooling, crops, seed), truth)
                        for seed, (_, truth) in query_sets.items()}
            pooled = {k: float(np.mean([f[k] for f in per_seed.values()])) for k in ("top1", "top5")}
            return pooled | {"per_query_set": {str(seed): f for seed, f in per_seed.items()}}

        def index_views(settings, n: int):
            plan = ViewPlan(42, n, 0, settings, size)
            views = render_items(items, plan, torch.device("cpu"))
            return views, np.repeat(np.array([i.sku_id for i in items], dtype=object), 1 + n)

        base = AugmentSettings()
        n_queries = sum(len(t) for _, t in query_sets.values())
        figures: dict = {"cpu": cpu_summary(), "device": "cpu", "precision": "fp32", "queries": n_queries,
                         "query_sets": args.seeds, "skus": len(skus), "catalog_photos": len(items),
                         "descriptors": {}, "augmentations": {}}
        if "descriptors" in args.parts:
            previous = replace(base, crop_scale=(0.5, 1.0), blur_prob=0.3)
            views, labels = index_views(previous, 5)
            figures["previous_defaults"] = measure(encoders["model"].encode_images(views), labels, "model",
                                                   CROPS["centre"])
            print(f"  previous defaults: {figures['previous_defaults']}", flush=True)
            views, labels = index_views(base, 5)
            for pooling, encoder in encoders.items():
                index = encoder.encode_images(views)
                for crop_name, crops in CROPS.items():
                    figures["descriptors"][f"{pooling}, {crop_name}"] = measure(index, labels, pooling, crops)
                    print(f"  {pooling}, {crop_name}: {figures['descriptors'][f'{pooling}, {crop_name}']}", flush=True)
        for name, (settings, n) in augment_variants(base).items() if "augmentations" in args.parts else ():
            views, labels = index_views(settings, n)
            index = encoders[DEFAULT_POOLING].encode_images(views)
            figures["augmentations"][name] = measure(index, labels, DEFAULT_POOLING, CROPS[DEFAULT_CROPS])
            figures["augmentations"][name]["vectors"] = int(len(views))
            print(f"  {name}: {figures['augmentations'][name]}", flush=True)
        figures["seconds"] = round(time.perf_counter() - started, 1)
    sets = " and ".join(str(len(t)) for _, t in query_sets.values())
    print(f"sku_index descriptors on {figures['cpu']}, device cpu, fp32: {sets} shop-floor queries (seeds "
          f"{', '.join(map(str, args.seeds))}) of {figures['skus']} look-alike SKUs ({figures['catalog_photos']} "
          f"catalog photos), embeddings only; top-1 pooled (per query set), top-5 pooled")
    if "previous_defaults" in figures:
        f = figures["previous_defaults"]
        each = " / ".join(f"{v['top1']:.3f}" for v in f["per_query_set"].values())
        print(f"  {'previous defaults (average, centre; crops 0.5-1, blur 30%)':<46} {f['top1']:.3f} ({each})  "
              f"{f['top5']:.3f}")
    print(f"  {'pooling, query crops (default augmentations)':<46} top-1                top-5")
    for name, f in figures["descriptors"].items():
        each = " / ".join(f"{v['top1']:.3f}" for v in f["per_query_set"].values())
        print(f"  {name:<46} {f['top1']:.3f} ({each})  {f['top5']:.3f}")
    print(f"  {'augmentations (' + DEFAULT_POOLING + ', ' + DEFAULT_CROPS + ')':<46} top-1                top-5  "
          f"index vectors")
    for name, f in figures["augmentations"].items():
        each = " / ".join(f"{v['top1']:.3f}" for v in f["per_query_set"].values())
        print(f"  {name:<46} {f['top1']:.3f} ({each})  {f['top5']:.3f}  {f['vectors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
