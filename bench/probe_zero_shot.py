"""Benchmark of the clip_zero_shot probe (mlprep.probe.zero_shot), side by side in one run (`make bench`).

  encoder only   the CLIP image encoder on the same images, decoded and resized beforehand
  probe          the probe as a shard runs it: row groups read from parquet, JPEG decode, resize, encode,
                 compare with the label prompts, results frame
`--images` JPEG images (320x240, random content, 10 labels) in one parquet file, 64 rows per row group;
ViT-B-32 with random weights at this machine's precision (the cost of the real model).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_images(path: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out, format="JPEG", quality=85)
        images.append(out.getvalue())
    labels = [f"class {k % 10}" for k in range(n)]
    pq.write_table(pa.table({"image": images, "label": labels}), path, row_group_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import pandas as pd
    import torch

    from mlprep.devices import cpu_summary, precision_name, select_precision
    from mlprep.encoders import ClipEncoder, ClipSpec
    from mlprep.failures import FailureLog
    from mlprep.probe.reader import decode_image, list_row_groups
    from mlprep.probe.zero_shot import ZeroShot, probe_rows, square_pixels

    dtype = select_precision(args.precision, torch.device("cpu"))
    encoder = ClipEncoder(ClipSpec("ViT-B-32"), torch.device("cpu"), dtype, batch_size=args.batch)
    probe = ZeroShot(encoder, [f"class {k}" for k in range(10)])
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "images.parquet", args.images)
        groups = list_row_groups(tmp).frame
        table = pq.read_table(Path(tmp) / "images.parquet")
        pixels = np.stack([square_pixels(decode_image(cell), encoder.image_size)
                           for cell in table.column("image").to_pylist()])
        encoder.encode_images(torch.from_numpy(pixels[: args.batch]))  # warm-up
        started = time.perf_counter()
        for start in range(0, len(pixels), args.batch):
            encoder.encode_images(torch.from_numpy(pixels[start : start + args.batch]))
        encoder_s = time.perf_counter() - started
        started = time.perf_counter()
        result = pd.concat(probe_rows(tmp, groups, probe, FailureLog(False), batch=args.batch))
        probe_s = time.perf_counter() - started
    assert len(result) == args.images
    print(f"clip_zero_shot probe on {cpu_summary()}, ViT-B-32 at {precision_name(dtype)}, batch {args.batch}, "
          f"{args.images} JPEG images 320x240")
    print(f"  encoder only {args.images / encoder_s:6.1f} img/s")
    print(f"  probe        {args.images / probe_s:6.1f} img/s  ({encoder_s / probe_s:.2f}x encoder only; target 0.8x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"precision": precision_name(dtype), "encoder_img_per_s":
                                               args.images / encoder_s, "probe_img_per_s": args.images / probe_s}))


if __name__ == "__main__":
    main()
