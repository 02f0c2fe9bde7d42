"""Benchmark of the clip_zero_shot probe (mlprep.probe.zero_shot), side by side in one run (`make bench`).

  encoder only   the CLIP image encoder on the probe's own views of the same images, rendered beforehand
  probe          the probe as a shard runs it: row groups read from parquet, decode, the centre view rendered
                 on the model's device, encode, compare with the label prompts, results frame (warmed up once)
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="decode workers of the probe")
    parser.add_argument("--jpeg-decoder", default="auto", choices=["auto", "cpu", "device"])
    parser.add_argument("--repeat", type=int, default=1, help="encoder-only passes over the views (a fast device)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import pandas as pd
    import torch

    from mlprep.devices import cpu_summary, precision_name, select_device, select_precision
    from mlprep.encoders import ClipEncoder, ModelSpec
    from mlprep.failures import FailureLog
    from mlprep.probe.reader import list_row_groups
    from mlprep.probe.zero_shot import ZeroShot, probe_chunks, probe_rows
    from mlprep.views import DeviceImages, ViewRenderer
    from mlprep.workers import keep_freed_memory

    keep_freed_memory()  # as the probe's shard job runs from its start
    device = select_device(args.device)
    dtype = select_precision(args.precision, device)
    encoder = ClipEncoder(ModelSpec("ViT-B-32"), device, dtype, batch_size=args.batch)
    probe = ZeroShot(encoder, [f"class {k}" for k in range(10)])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "images.parquet", args.images)
        groups = list_row_groups(tmp).frame
        # the probe's own views (decoded and rendered beforehand), for the encoder alone
        size = encoder.image_size
        images, renderer = DeviceImages(device, size), ViewRenderer(size, args.batch, device)
        views = []
        for chunk in probe_chunks(tmp, groups, probe.labels, size, args.batch, 0, device, args.jpeg_decoder):
            rendered, counts = renderer(images(chunk), [i.transforms for i in chunk.items],
                                        [(i.width, i.height) for i in chunk.items])
            views.append(rendered[: sum(counts)])
        views = torch.cat(views)
        encoder.encode_device(views[: args.batch])  # warm-up
        sync()
        started = time.perf_counter()
        for _ in range(args.repeat):
            encoder.encode_device(views)
        sync()
        encoder_s = (time.perf_counter() - started) / args.repeat
        list(probe_rows(tmp, groups, probe, FailureLog(False), workers=args.workers, jpeg_decoder=args.jpeg_decoder))
        started = time.perf_counter()
        result = pd.concat(probe_rows(tmp, groups, probe, FailureLog(False), workers=args.workers,
                                      jpeg_decoder=args.jpeg_decoder))
        probe_s = time.perf_counter() - started
    assert len(result) == args.images
    where = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"clip_zero_shot probe on {device}{where}, CPU {cpu_summary()}, ViT-B-32 at {precision_name(dtype)}, "
          f"batch {args.batch}, {args.workers} decode workers, jpeg_decoder {args.jpeg_decoder}, "
          f"{args.images} JPEG images 320x240")
    print(f"  encoder only {args.images / encoder_s:8.1f} img/s")
    print(f"  probe        {args.images / probe_s:8.1f} img/s  ({encoder_s / probe_s:.2f}x encoder only; "
          f"target 0.8x on a CPU, 0.6x on a GPU)")
    if args.json:
        Path(args.json).write_text(json.dumps({"precision": precision_name(dtype), "device": str(device),
                                               "gpu": torch.cuda.get_device_name(device) if where else None,
                                               "batch": args.batch, "workers": args.workers,
                                               "encoder_img_per_s": args.images / encoder_s,
                                               "probe_img_per_s": args.images / probe_s}))


if __name__ == "__main__":
    main()
