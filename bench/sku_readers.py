"""What a sku_index shard job's readers spend on each photo, by part, side by side in one run.

A GPU encodes a photo's views in well under a millisecond, so on a GPU the readers' CPU sets the shard job's pace
(docs/gpu.md). Generated product photos (mlprep.demo's generator, --size) go through the readers' own code
(mlprep.sku.encode.ShardImages, one process, one thread), with the shipped config's views and:
  views only           re-ranking features off, no shop-floor queries
  shipped, share 1     local features and a shop-floor query of every photo (a catalog of up to
                       eval.shop_floor.max_queries photos)
  shipped, share 1/16  the same past max_queries, at 20,000 photos (1 photo in 16 gets a query)
  ..., max_side S      the same with local features on the photo scaled to a long side of S (rerank.max_side,
                       --max-sides): SIFT's cost follows the pixels it is given
`--give-back-memory` runs the readers' rows without mlprep.workers.keep_freed_memory, as they ran before it (the
`--job-threads` row runs as a shard job does, with it).
Each row: CPU ms a photo in all, and by part (read, views, local_features, shop_floor: what the shard's stats.json
reports as reader_seconds), and what a GPU job with R readers could then supply: R / (ms a photo) photos/s, times
the views a photo (--readers; the GPU itself not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--jpeg-decoder", choices=["device", "cpu"], default="device",
                        help="the readers' path for the views: JPEG bytes for the GPU's decoder, or decoded here")
    parser.add_argument("--readers", type=int, default=15, help="readers of the projected GPU job (16 cores: 15)")
    parser.add_argument("--max-sides", type=int, nargs="*", default=[400, 360],
                        help="rerank.max_side values to time beside the shipped one, at share 1/16")
    parser.add_argument("--give-back-memory", action="store_true",
                        help="leave glibc's allocator as it starts (freed blocks unmapped at once): the readers before "
                             "mlprep.workers.keep_freed_memory")
    parser.add_argument("--job-threads", type=int, default=0,
                        help="also run the shard job's loop (encode_items) on 48 of the photos with the shipped "
                             "config and model, its readers in its own process (decode_workers 0), on this many "
                             "threads: photos/s at share 1 and 1/16")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import cv2
    import torch
    import yaml

    from mlprep.demo import write_catalog
    from mlprep.devices import cpu_summary
    from mlprep.sku.encode import ShardImages, view_plan
    from mlprep.workers import keep_freed_memory

    torch.set_num_threads(1)  # as a reader runs (mlprep.workers), reusing the memory it frees
    cv2.setNumThreads(1)
    if not args.give_back_memory:
        keep_freed_memory()
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["sku_index"]
    shipped = view_plan(cfg, 7, 224)
    variants = {"views only": dataclasses.replace(shipped, geometry=None, shop_floor=None),
                "shipped, share 1": shipped,
                "shipped, share 1/16": dataclasses.replace(shipped, shop_floor_share=1 / 16)}
    for side in args.max_sides:
        variants[f"shipped, share 1/16, max_side {side}"] = dataclasses.replace(
            shipped, shop_floor_share=1 / 16, geometry=dataclasses.replace(shipped.geometry, max_side=side))
    figures = {"cpu": cpu_summary(), "photos": args.photos, "size": args.size, "jpeg_decoder": args.jpeg_decoder,
               "freed_memory_kept": not args.give_back_memory,
               "views_per_photo": shipped.views_per_item, "readers": args.readers, "rows": {}}
    print(figures["cpu"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        catalog_path = write_catalog(Path(tmp), (args.photos + 1) // 2, 2, tuple(args.size), 0)
        catalog = json.loads(Path(catalog_path).read_text())
        paths = [str(Path(tmp) / "images" / name) for entry in catalog for name in entry["images"]][: args.photos]
        ids = [f"photo{k}" for k in range(len(paths))]
        for name, plan in variants.items():
            dataset = ShardImages(paths, ids, plan, 16, args.jpeg_decoder == "device")
            parts: Counter = Counter()  # seconds by part
            started = time.perf_counter()
            for k in range(len(dataset)):
                for item in dataset[k].items:
                    if item.error is not None:
                        raise SystemExit(f"{paths[item.tag]}: {item.error}")
                    parts.update(item.extra[2]["seconds"])
            ms = (time.perf_counter() - started) / len(paths) * 1000
            photos_per_s = args.readers / ms * 1000
            by_part = {part: round(seconds / len(paths) * 1000, 2) for part, seconds in parts.items()}
            row = {"ms_per_photo": round(ms, 2), "by_part": by_part,
                   f"{args.readers} readers: photos/s": round(photos_per_s),
                   f"{args.readers} readers: views/s": round(photos_per_s * plan.views_per_item)}
            figures["rows"][name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)
        if args.job_threads:
            figures["job"] = job_rates(cfg, catalog_path, Path(tmp) / "images", args.job_threads)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def job_rates(cfg: dict, catalog: Path, images: Path, threads: int, photos: int = 48) -> dict:
    """Photos/s of a CPU shard job's loop with its readers in its own process (what `decode_workers: auto` gives a
    job of under 4 threads) over the catalog's first `photos` photos, with the shipped config's model, at shop-floor
    share 1 and 1/16."""
    import os

    import torch

    from mlprep.failures import FailureLog
    from mlprep.sku.catalog import read_catalog
    from mlprep.sku.encode import encode_items, load_encoder, view_plan

    torch.set_num_threads(threads)
    encoder = load_encoder(cfg, "cpu", "auto", threads, 7)
    items = read_catalog(str(catalog), str(images), 1).items[:photos]
    rates = {}
    with open(os.devnull, "w") as quiet:
        for share in (1, 1 / 16):
            plan = view_plan(cfg, 7, encoder.image_size, shop_floor_share=share)
            encode_items(items[:4], plan, encoder, FailureLog(False), workers=0, progress=quiet)  # warm-up
            started = time.perf_counter()
            encode_items(items, plan, encoder, FailureLog(False), workers=0, progress=quiet)
            rates[f"share {share:g}"] = round(len(items) / (time.perf_counter() - started), 2)
    print(f"shard job, {threads} threads, readers in its process ({cfg['model']['name']}): "
          f"{json.dumps(rates)} photos/s", flush=True)
    return {"threads": threads, "photos_per_s": rates}


if __name__ == "__main__":
    main()
