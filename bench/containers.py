"""One sku_index shard read from files, from webdataset tars and from parquet of bytes, on a local disk and from a
local S3 server (rclone serve s3 on a loopback port), side by side in one run.

The same images (the demo's, copied until there are --images of them, each copy a distinct file) are laid out
five ways and one shard of them is run through, per form and round (the forms alternate, --repeat rounds):
  read        the shard's bytes only (mlprep.sources.ItemReader: whole files, one pread per tar member, one read
              per parquet row group): how much is read against the members' own bytes, and how fast
  feed        what the encode job's readers do: read, decode, draw the views (image_chunks, the job's workers)
  shard job   the whole encode job (mlprep.sku.encode.encode_shard) with the config's model, from its list
Ratios are to files measured in the same round (median over rounds), and for the S3 forms also to the same
containers read locally; absolute figures move with the machine. Requests are counted per item read, and for a
second index of the bucket (a no-op rerun: listing requests only).

    .venv/bin/python bench/containers.py                        # 256 images, 3 rounds (~20 min on 2 cores)
    .venv/bin/python bench/containers.py --images 64 --repeat 1 --no-job     # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from mlprep.demo import pack_files  # noqa: E402
from mlprep.devices import cpu_summary  # noqa: E402
from mlprep.shardlists import ShardLists, list_path  # noqa: E402
from mlprep.sku.catalog import LIST_COLUMNS, Source, read_catalog, sync_lists  # noqa: E402
from mlprep.sources import ItemReader, index_dataset  # noqa: E402
from mlprep.storage import LocalS3Server, count_requests  # noqa: E402

FORMS = ("files", "webdataset", "parquet", "s3-webdataset", "s3-parquet")


def make_images(folder: Path, n: int) -> Path:
    """n distinct image files from the demo's (a copy differs by trailing bytes a JPEG decoder ignores), and a
    sku_data.json of them, two per SKU."""
    sources = sorted((REPO / "resources/demo/sku/images").glob("*.jpg"))
    images = folder / "images"
    images.mkdir(parents=True)
    names = []
    for k in range(n):
        name = f"img{k:06d}.jpg"
        (images / name).write_bytes(sources[k % len(sources)].read_bytes() + k.to_bytes(4, "big"))
        names.append(name)
    skus = [{"sku_id": f"sku{s:05d}", "name": f"Product {s}", "images": names[2 * s : 2 * s + 2]}
            for s in range(n // 2)]
    (folder / "sku_data.json").write_text(json.dumps(skus))
    return folder / "sku_data.json"


def config() -> dict:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    return cfg


def run_read(items, storage) -> tuple[float, int]:
    reader = ItemReader(what="image file", storage=storage)
    started = time.perf_counter()
    total = sum(len(reader.read(*i.location)) for i in items)
    seconds = time.perf_counter() - started
    reader.close()
    return seconds, reader.bytes_read or total


def run_feed(items, cfg: dict, workers: int, storage) -> float:
    import torch

    from mlprep.sku.encode import image_chunks, view_plan

    plan = view_plan(cfg["sku_index"], cfg["seed"], 224)
    started = time.perf_counter()
    n = 0
    for chunk in image_chunks([i.location for i in items], [i.item_id for i in items], plan, 32, workers,
                              torch.device("cpu"), "cpu",
                              ItemReader(cfg["sku_index"].get("parquet_column", "auto"), storage=storage)):
        n += len(chunk.items)
        errors = [i.error for i in chunk.items if i.error is not None]
        if errors:
            raise AssertionError(f"the feed failed items: {errors[:3]}")
    if n != len(items):
        raise AssertionError(f"the feed gave {n} items of {len(items)}")
    return time.perf_counter() - started


def run_job(lists: Path, cfg: dict, out: Path, storage) -> float:
    from mlprep.sku.encode import encode_shard

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        stats = encode_shard("000-of-001", list_path(lists, "000-of-001"), cfg["sku_index"], cfg["seed"], "cpu",
                             "fp32", True, 2, out, progress=quiet, storage=storage)
    if stats["items_failed"]:
        raise AssertionError(f"{stats['items_failed']} items failed")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--per-container", type=int, default=64, help="images per tar or parquet file")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="decode workers of the feed (the job's own on 2 cores)")
    parser.add_argument("--no-job", action="store_true", help="skip the whole-job rows (they load the model)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    cfg = config()
    cfg["sku_index"]["augment_per_image"] = 2
    cfg["sku_index"]["decode_workers"] = args.workers
    work = Path(tempfile.mkdtemp(prefix="mlprep-containers-"))
    (work / "s3" / "bucket").mkdir(parents=True)
    server = LocalS3Server(work / "s3")
    os.environ.update(server.env)
    storage = server.storage
    try:
        sku_data = make_images(work, args.images)
        items, lists, sources = {}, {}, {}
        for form in FORMS:
            fmt = form.removeprefix("s3-")
            source = Source(str(work / "images"))
            if form.startswith("s3-"):
                pack_files(work / "images", work / "s3" / "bucket" / fmt, fmt, args.per_container)
                source = Source(f"s3://bucket/{fmt}", fmt, storage=storage)
            elif form != "files":
                pack_files(work / "images", work / form, form, args.per_container)
                source = Source(str(work / form), form)
            catalog = read_catalog(sku_data, source, 1, work / f"cache-{form}")
            if catalog.failures or len(catalog.items) != args.images:
                raise AssertionError(f"{form}: {len(catalog.items)} items, failures {catalog.failures[:3]}")
            items[form], sources[form] = catalog.items, source
            lists[form] = work / f"lists-{form}"
            sync_lists(sku_data, source, ShardLists(lists[form], ["000-of-001"], LIST_COLUMNS))
        own = sum(i.size for i in items["webdataset"])
        rows: dict[str, dict[str, list[float]]] = {s: {f: [] for f in FORMS} for s in ("read", "feed", "shard job")}
        read_bytes, requests = {}, {}
        for _ in range(args.repeat):
            for form in FORMS:
                counts = count_requests(storage)
                seconds, read_bytes[form] = run_read(items[form], storage)
                requests[form] = sum(counts.values()) / len(items[form])
                rows["read"][form].append(seconds)
                rows["feed"][form].append(run_feed(items[form], cfg, args.workers, storage))
                if not args.no_job:
                    rows["shard job"][form].append(run_job(lists[form], cfg, work / f"out-{form}", storage))
        noop = {}
        for form in ("s3-webdataset", "s3-parquet"):  # the index again, every container unchanged
            counts = count_requests(storage)
            source = sources[form]
            index_dataset(source.images_dir, source.input_format, work / f"cache-{form}", storage=storage)
            noop[form] = dict(counts)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"one sku_index shard from files, tars and parquet; {args.images} images ({own / 1e6:.1f} MB), "
          f"{args.per_container} per container, {args.repeat} rounds; {cpu_summary()}; fp32")
    print(f"{'stage':<10} {'files s':>8} " + " ".join(f"{f + ' s':>16} {'ratio':>6}" for f in FORMS[1:])
          + "   (ratio: throughput against files, median of rounds)")
    figures = {"images": args.images, "member_bytes": own, "bytes_read": read_bytes, "requests_per_item": requests,
               "noop_index_requests": noop, "rows": {}}
    for stage, by_form in rows.items():
        if not by_form["files"]:
            continue
        med = {f: statistics.median(v) for f, v in by_form.items()}
        ratio = {f: med["files"] / med[f] for f in FORMS}
        figures["rows"][stage] = {"seconds": med, "ratio": ratio}
        print(f"{stage:<10} {med['files']:8.2f} " + " ".join(f"{med[f]:16.2f} {ratio[f]:6.2f}" for f in FORMS[1:]))
        for fmt in ("webdataset", "parquet"):
            print(f"{'':<10} s3-{fmt} against local {fmt}: {med[fmt] / med['s3-' + fmt]:.2f}x")
    for form in FORMS:
        print(f"bytes read from {form}: {read_bytes[form]:,} = {read_bytes[form] / own:.3f}x the images' own bytes; "
              f"{requests[form]:.2f} requests per item")
    for form, counts in noop.items():
        print(f"a no-op index of {form} ({len({i.path for i in items[form]})} containers): {counts}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
