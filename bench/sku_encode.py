"""Benchmark of the sku_index encode shard job, measured side by side in one run (`make bench`).

Rows (views per second over the same demo images, same model, batch size and thread budget):
  encoder only      pre-rendered uint8 views straight into the model: the ceiling
  shard job         mlprep's encode loop: decode + augment in a worker process, batched encoding
  shard job inline  the same loop with decoding in the main process (no overlap)
  seed approach     the seed script's original loop: PIL decode, torchvision transforms per view,
                    one image per model call, fp32, on the same device
Each shard job row also gives its steady state, the views per second after its first batch was queued, and when
that was (readers started, the first chunk read): a short run is mostly start-up, which the whole run's rate hides.
Ratios are what to read; absolute numbers move with the machine's load.
On a GPU, `--repeat 64 --encoder-batches 32 128 512 --decode-workers 1 4 8 16 --jpeg-decoders device cpu`
gives the encoder enough work to time, finds its best batch and shows how many decode workers keep it fed,
with the GPU's JPEG decoder and without. Every run also checks the device path against the CPU on 16
images: views rendered on the device, views of images the device decoded, and the device's embeddings
against CPU fp32 ones (a shard encoded on a GPU must land in the same index as one encoded on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from mlprep.devices import cpu_summary, precision_name, select_device, select_precision
from mlprep.encoders import ClipEncoder, ModelSpec
from mlprep.failures import FailureLog
from mlprep.sku.augment import AugmentSettings
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, encode_items, render_items
from table import steady_rate

REPO = Path(__file__).resolve().parents[1]


def seed_augment():
    """The seed script's per-view PIL/torchvision augmentation."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.5, 1.0)),
            T.RandomRotation(15),
            T.RandomPerspective(0.15, p=1.0),
            T.ColorJitter(0.3, 0.3, 0.3, 0.05),
            T.RandomApply([T.GaussianBlur(5, (0.1, 1.5))], p=0.3),
        ]
    )


def seed_approach(paths: list[str], views_per_image: int, spec: ModelSpec, device: torch.device) -> float:
    """The seed's sequential baseline: per view, PIL transforms and one fp32 model call."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.pretrained, device=device)
    model.eval()
    augment = seed_augment()
    n = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            for k in range(views_per_image):
                view = image if k == 0 else augment(image)
                model.encode_image(preprocess(view).unsqueeze(0).to(device))
                n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - started)


def repeated_catalog(sku_data: str, repeat: int, folder: str) -> str:
    """The catalog listed `repeat` times under new SKU ids (same image files): more work for a fast device."""
    entries = json.loads(Path(sku_data).read_text())
    copies = [{**e, "sku_id": f"{e['sku_id']}-r{k}"} for k in range(repeat) for e in entries]
    out = Path(folder) / "catalog.json"
    out.write_text(json.dumps(copies))
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sku-data", default=str(REPO / "resources/demo/sku/sku_data.json"))
    parser.add_argument("--images-dir", default=str(REPO / "resources/demo/sku/images"))
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the shard job's batch (default: the best of --encoder-batches)")
    parser.add_argument("--encoder-batches", type=int, nargs="+", default=[32], help="encoder-only rows to run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--augment-per-image", type=int, default=5)
    parser.add_argument("--seed-images", type=int, default=8, help="images for the (slow) seed baseline")
    parser.add_argument("--repeat", type=int, default=1, help="list the catalog this many times (more views)")
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[1], help="shard job rows to run")
    parser.add_argument("--jpeg-decoders", nargs="+", default=["auto"], choices=["auto", "cpu", "device"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="mlprep-bench-")
    sku_data = repeated_catalog(args.sku_data, args.repeat, scratch) if args.repeat > 1 else args.sku_data
    items = read_catalog(sku_data, args.images_dir, 1).items
    device = select_device(args.device)
    dtype = select_precision(args.precision, device)
    spec = ModelSpec(args.model, args.pretrained)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    encoders = {b: ClipEncoder(spec, device, dtype, b) for b in args.encoder_batches}
    size = next(iter(encoders.values())).image_size
    plan = ViewPlan(7, args.augment_per_image, 0, AugmentSettings(), size)
    views_per_image = 1 + args.augment_per_image
    rendered = render_items(items, plan, device).to(device)
    rows = {}
    for batch, encoder in encoders.items():  # the encoder alone on views already on its device
        encoder.encode_device(rendered[:batch])  # warm-up
        sync()
        started = time.perf_counter()
        encoder.encode_device(rendered)
        sync()
        rows[f"encoder only, batch {batch}"] = len(rendered) / (time.perf_counter() - started)
    best = max(encoders, key=lambda b: rows[f"encoder only, batch {b}"])
    rows["encoder only"] = rows[f"encoder only, batch {best}"]
    batch = args.batch_size or best
    encoder = encoders.get(batch) or ClipEncoder(spec, device, dtype, batch)
    checks = equivalence(items[:16], plan, spec, encoder, device)
    shard_rows = [(f"shard job, {w} decode worker{'s' * (w > 1)}" + (f", jpeg_decoder {d}" if d != "auto" else ""),
                   w, d) for d in args.jpeg_decoders for w in args.decode_workers]
    steady, first = {}, {}  # the steady state after the first batch, and when that batch was queued
    for name, workers, decoder in [*shard_rows, ("shard job inline", 0, "auto")]:
        queued: list[float] = []
        started = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            out = encode_items(items, plan, encoder, FailureLog(False), workers=workers, progress=quiet,
                               jpeg_decoder=decoder, on_encoded=lambda: queued.append(time.perf_counter() - started))
        seconds, views = time.perf_counter() - started, len(out.index_vectors)
        rows[name] = views / seconds
        if queued:  # the last batch holds the rest
            marks = [(t, batch) for t in queued[:-1]] + [(queued[-1], views - batch * (len(queued) - 1))]
            steady[name], first[name] = steady_rate(marks, seconds), queued[0]
    seed_paths = [i.path for i in items[: args.seed_images]]
    rows["seed approach"] = seed_approach(seed_paths, views_per_image, spec, device)

    where = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    header = (
        f"sku_index encode, {len(items)} images x {views_per_image} views, {args.model} at "
        f"{precision_name(dtype)} on {device}{where}, shard job batch {batch} (encoder alone: best of "
        f"{args.encoder_batches}), {args.threads} threads; CPU: {cpu_summary()}"
    )
    print(header)
    print(f"{'setup':<48} {'views/s':>9} {'vs encoder only':>16} {'vs seed approach':>17}")
    for name, rate in rows.items():
        after = f"  steady {steady[name]:9.1f} ({steady[name] / rows['encoder only']:.2f}x), first batch at " \
                f"{first[name]:.2f} s" if steady.get(name) else ""
        print(f"{name:<48} {rate:9.1f} {rate / rows['encoder only']:16.2f} {rate / rows['seed approach']:17.2f}"
              f"{after}")
    for name, value in checks.items():
        print(f"{name}: {value}")
    if args.json:
        figures = {"setup": header, "views_per_s": rows, "steady_views_per_s": steady, "first_batch_s": first,
                   "best_encoder_batch": best, "shard_batch": batch,
                   "device": str(device), "gpu": where.strip(" ()") or None, "precision": precision_name(dtype),
                   **checks}
        Path(args.json).write_text(json.dumps(figures, indent=2))


def equivalence(items, plan: ViewPlan, spec: ModelSpec, encoder: ClipEncoder, device: torch.device) -> dict:
    """The device path against the CPU: views rendered on the device from CPU-decoded images, and views of
    images the device decoded (jpeg_decoder device), each against the CPU's views (largest and mean pixel
    difference); the device's embeddings of its views against CPU fp32 embeddings of the same views."""
    cpu = torch.device("cpu")
    reference = render_items(items, plan, cpu, "cpu").int()
    rendered = render_items(items, plan, device, "cpu").cpu()
    decoded = render_items(items, plan, device, "device").cpu()
    render_diff = (rendered.int() - reference).abs()
    decode_diff = (decoded.int() - reference).abs()
    on_device = encoder.encode_images(rendered)
    fp32 = ClipEncoder(spec, cpu, torch.float32, encoder.batch_size).encode_images(rendered)
    return {"render_max_abs_diff": int(render_diff.max()), "render_mean_abs_diff": float(render_diff.float().mean()),
            "device_decode_max_abs_diff": int(decode_diff.max()),
            "device_decode_mean_abs_diff": float(decode_diff.float().mean()),
            "min_cosine_to_cpu_fp32": float((on_device * fp32).sum(axis=1).min()), "equivalence_views": len(reference)}


if __name__ == "__main__":
    main()
