"""Benchmark of SKU retrieval on shop-floor photos of look-alike products, measured side by side in one run.

The fine-grained catalog (mlprep.demo.write_lookalike_catalog): each of the demo's 12 real photos cut into 4
overlapping regions, each region a SKU with 2 catalog shots (48 SKUs that share colours, textures and parts with
their neighbours). Queries: 2 shop-floor photos of each product (mlprep.sku.shopfloor, another seed than the eval's),
taken of the product itself rather than of a catalog shot. The index is built by the workflow with the default
config (packaged EfficientNet-Lite0), then the queries go through `SkuSearcher.search`, the path of `search-sku` and
the service, with re-ranking and without:
  embedding only / re-ranked   top-1 and top-5 SKU accuracy
  re-rank latency              per query, top-10: ranking by the query's embedding (computed once, not timed),
                               with the query's features and the verification where re-ranked; median and p90
  keypoint artefact            bytes per catalog photo, and what the shard jobs spent on features
  the run's eval.json          the same photos as its `eval.queries` (searched by the workflow: the figures must
                               equal search-sku's), its shop-floor figures (leave-one-photo-out) and its
                               augmented-view ones
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, augment_per_image: int, queries: dict) -> Path:
    import yaml

    from mlprep.config import only

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(only("sku_index"))
    config["sku_index"].update(sku_data=str(work / "data" / "sku_data.json"), images_dir=str(work / "data" / "images"),
                               augment_per_image=augment_per_image)
    config["sku_index"]["eval"]["queries"] = queries
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(work), "--configfile", str(work / "config.yaml"), "--cores", "all", "sku_index"],
                   check=True, stdout=subprocess.DEVNULL)
    return work / "results" / "sku_index"


def write_queries(work: Path, per_sku: int, seed: int) -> tuple[list[Path], list[str]]:
    """The catalog and the shop-floor photos of its products, with a truth table (eval.queries reads it)."""
    import pandas as pd

    from mlprep.demo import lookalike_queries, write_lookalike_catalog

    catalog = write_lookalike_catalog(work / "data")
    folder = work / "queries"
    folder.mkdir()
    paths, truth = [], []
    for sku, data in lookalike_queries(json.loads(catalog.read_text()), per_sku, seed):
        paths.append(folder / f"{sku}_{truth.count(sku)}.jpg")
        paths[-1].write_bytes(data)
        truth.append(sku)
    pd.DataFrame({"image": [p.name for p in paths], "sku_id": truth}).to_csv(folder / "truth.csv", index=False)
    return paths, truth


def main() -> None:
    from mlprep.devices import cpu_summary
    from mlprep.sku.search import SkuSearcher

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries-per-sku", type=int, default=2)
    parser.add_argument("--augment-per-image", type=int, default=5)
    parser.add_argument("--seed", type=int, default=101, help="the queries' seed (the eval's is the config's)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        paths, truth = write_queries(work, args.queries_per_sku, args.seed)
        folder = build(work, args.augment_per_image, {"images_dir": str(work / "queries"),
                                                      "truth": str(work / "queries" / "truth.csv")})
        build_s = time.perf_counter() - started
        figures = {"cpu": cpu_summary(), "device": "cpu", "queries": len(paths), "build_s": round(build_s, 1)}
        searchers = {"embedding only": SkuSearcher(folder / "index.faiss", device="cpu", rerank=False),
                     "re-ranked": SkuSearcher(folder / "index.faiss", device="cpu", rerank=True)}
        vectors, ok, failed, datas = searchers["re-ranked"]._embed(paths)  # the queries' embeddings, once
        assert not failed and ok == list(range(len(paths)))
        for name, searcher in searchers.items():
            searcher.rank_images(datas[:2], vectors[:2], 5)  # warm
            times, ranked = [], []
            for k in range(len(paths)):
                start = time.perf_counter()
                ranked += searcher.rank_images([datas[k]], vectors[k : k + 1], 5)
                times.append(time.perf_counter() - start)
            figures[name] = {f"top{n}": float(np.mean([t in [r.sku_id for r in row[:n]] for row, t in
                                                       zip(ranked, truth)])) for n in (1, 5)}
            figures[name] |= {"ms_per_query_p50": round(1000 * np.median(times), 1),
                              "ms_per_query_p90": round(1000 * np.percentile(times, 90), 1)}
            if name == "re-ranked":
                figures[name]["verified_first"] = float(np.mean([row[0].ranked_by == "geometry" for row in ranked]))
        figures["rerank_ms_per_query"] = figures["re-ranked"]["ms_per_query_p50"]
        photos = json.loads((folder / "index_info.json").read_text())["n_items_ok"]
        artefact = sum((folder / f"local_features{s}").stat().st_size
                       for s in (".parquet", "_points.npy", "_descriptors.npy"))
        figures["keypoint_bytes_per_photo"] = round(artefact / photos)
        evaluation = json.loads((folder / "eval.json").read_text())
        figures["eval_json"] = {k: evaluation[k] for k in ("query_photos", "shop_floor", "augmented_index")}
    print(f"sku_index retrieval of look-alikes on {figures['cpu']}, device cpu: {figures['queries']} shop-floor "
          f"queries of 48 SKUs cut from 12 photos")
    for name in ("embedding only", "re-ranked"):
        f = figures[name]
        print(f"  {name:<15} top-1 {f['top1']:.3f}  top-5 {f['top5']:.3f}  {f['ms_per_query_p50']:.0f} ms a query "
              f"(p90 {f['ms_per_query_p90']:.0f})")
    print(f"  re-ranking takes {figures['rerank_ms_per_query']:.0f} ms a query (target <= 100); keypoints "
          f"{figures['keypoint_bytes_per_photo'] / 1024:.1f} KB a photo (target <= 64)")
    photos = figures["eval_json"]["query_photos"]
    print(f"  eval.json, the same photos as eval.queries: {photos['embedding']} -> re-ranked {photos['reranked']}")
    floor = figures["eval_json"]["shop_floor"]
    print(f"  eval.json: shop floor {floor['embedding']} -> re-ranked {floor.get('reranked')}; augmented views "
          f"{figures['eval_json']['augmented_index']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
