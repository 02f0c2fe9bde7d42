"""Where a sku shard job's time goes: the encode loop (mlprep.sku.encode.encode_items) under torch.profiler.

Runs the shard job's own loop over the demo catalog (listed --repeat times) with --workers decode workers and
--jpeg-decoder, once to warm up and once profiled, and writes:
  - time to the first encoded chunk and the steady-state rate after it (views/s), measured apart;
  - the operators with the most self CPU time and, on a GPU, the most device time (torch.profiler);
  - how many host-device copies and synchronisations the loop made, per chunk, and
    `torch.cuda.set_sync_debug_mode("warn")`'s count of synchronising calls (GPU only).
On a CPU (`--device cpu`) the same loop and the CPU tables: what bench/device_check.py runs there too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mlprep.devices import cpu_summary, precision_name, select_device, select_precision
from mlprep.encoders import ClipEncoder, ModelSpec
from mlprep.failures import FailureLog
from mlprep.sku.augment import AugmentSettings
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, encode_items

REPO = Path(__file__).resolve().parents[1]
COPY_OPS = ("aten::copy_", "aten::_to_copy", "cudaMemcpyAsync", "Memcpy HtoD", "Memcpy DtoH")
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def main() -> None:
    from sku_encode import repeated_catalog

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jpeg-decoder", default="auto", choices=["auto", "cpu", "device"])
    parser.add_argument("--repeat", type=int, default=16)
    parser.add_argument("--augment-per-image", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None, help="a folder for the profiler's tables (default: a temp folder)")
    parser.add_argument("--json", help="the figures")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="mlprep-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="mlprep-profile-")
    sku_data = repeated_catalog(str(REPO / "resources/demo/sku/sku_data.json"), args.repeat, scratch)
    items = read_catalog(sku_data, str(REPO / "resources/demo/sku/images"), 1).items
    device = select_device(args.device)
    dtype = select_precision("auto", device)
    encoder = ClipEncoder(ModelSpec(args.model), device, dtype, args.batch)
    plan = ViewPlan(7, args.augment_per_image, 0, AugmentSettings(), encoder.image_size)

    def run(on_encoded=None):
        with open(os.devnull, "w") as quiet:
            return encode_items(items, plan, encoder, FailureLog(False), workers=args.workers, progress=quiet,
                                jpeg_decoder=args.jpeg_decoder, on_encoded=on_encoded)

    run()  # warm-up: kernels loaded, caches filled
    marks: list[float] = []  # when each encoder batch was launched
    started = time.perf_counter()
    syncs = 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
            result = run(on_encoded=lambda: marks.append(time.perf_counter()))
            if device.type == "cuda":
                torch.cuda.synchronize()
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    total_s = time.perf_counter() - started
    views = len(result.index_vectors) + len(result.query_vectors)
    first_s = marks[0] - started if marks else None
    # batches after the first are full but maybe the last: the steady rate between the first and the last launch
    steady = (len(marks) - 1) * args.batch / (marks[-1] - marks[0]) if len(marks) > 2 and marks[-1] > marks[0] \
        else None
    events = prof.key_averages()
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
    (out / "cpu_ops.txt").write_text(cpu_table)
    device_table = None
    if device.type == "cuda":
        device_table = events.table(sort_by="self_cuda_time_total", row_limit=args.top)
        (out / "cuda_ops.txt").write_text(device_table)
    counts = {e.key: e.count for e in events}
    chunks = max(1, len(marks))  # per encoder batch: a chunk fills one
    figures = {
        "setup": f"{len(items)} images x {1 + args.augment_per_image} views, {args.model} {precision_name(dtype)} "
                 f"on {device}, batch {args.batch}, {args.workers} decode workers, jpeg_decoder {args.jpeg_decoder}, "
                 f"{args.threads} threads; CPU: {cpu_summary()}",
        "views": views, "seconds": round(total_s, 3), "views_per_s": round(views / total_s, 1),
        "first_chunk_s": None if first_s is None else round(first_s, 3),
        "steady_views_per_s": None if steady is None else round(steady, 1), "batches": len(marks),
        "copies_per_chunk": {k: round(counts.get(k, 0) / chunks, 2) for k in COPY_OPS if counts.get(k)},
        "syncs_per_chunk": {k: round(counts.get(k, 0) / chunks, 2) for k in SYNC_OPS if counts.get(k)},
        "sync_debug_warnings": syncs,
        "top_cpu_ops": [(e.key, round(e.self_cpu_time_total / 1e3, 2), e.count)
                        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]],
        "top_device_ops": [(e.key, round(getattr(e, "self_device_time_total", 0) / 1e3, 2), e.count)
                           for e in sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[: args.top]]
        if device.type == "cuda" else None,
        "tables": str(out),
    }
    print(json.dumps({k: v for k, v in figures.items() if not k.startswith("top_")}, indent=2))
    print(cpu_table)
    if device_table:
        print(device_table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
