"""Benchmark of the sku_index encode shard job, measured side by side in one run (`make bench`).

Rows (views per second over the same demo images, same model, batch size and thread budget):
  encoder only      pre-rendered uint8 views straight into the model: the ceiling
  readers only      the readers' work alone, in this process: read, decode (or pass a JPEG on), view numbers
  render only       the device's work on the readers' chunks alone: decode where it does, render every view
  shard job         mlprep's encode loop: decode + augment in a worker process, batched encoding
  shard job inline  the same loop with decoding in the main process (no overlap)
  stages one after the other   what the three stages give done in turn, each at its rate alone: the bound of a
                    job whose readers share the encoder's cores (2 cores: nothing overlaps)
  seed approach     the seed script's original loop: PIL decode, torchvision transforms per view,
                    one image per model call, fp32, on the same device
With --rounds N every row runs N times, round after round, and the figures are medians; a shard row's ratio is
taken against the encoder alone in the same round, with the lowest and highest of the rounds beside it.
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
from statistics import median

import torch

from mlprep.devices import cpu_summary, precision_name, select_device, select_precision
from mlprep.encoders import ClipEncoder, ModelSpec
from mlprep.failures import FailureLog
from mlprep.sku.augment import AugmentSettings
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, chunk_renderer, encode_items, item_chunks, render_items
from mlprep.views import items_per_chunk
from mlprep.workers import keep_freed_memory
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
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, round after round, and report medians: on a shared host "
                             "a row's rate moves by a fifth from minute to minute, the rows of one round much less")
    parser.add_argument("--decode-workers", type=int, nargs="+", default=[1], help="shard job rows to run")
    parser.add_argument("--jpeg-decoders", nargs="+", default=["auto"], choices=["auto", "cpu", "device"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    keep_freed_memory()  # as a shard job's process runs from its start (its readers set it before the model is built)
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
    for encoder in encoders.values():
        encoder.encode_device(rendered[: encoder.batch_size])  # warm-up
    sync()
    runs: dict[str, list[float]] = {}  # every row's rate, round by round
    steady: dict[str, list[float]] = {}  # the steady state after the first batch, and when that batch was queued
    first: dict[str, list[float]] = {}
    batch, job_encoder = args.batch_size, None
    shard_rows = [(f"shard job, {w} decode worker{'s' * (w > 1)}" + (f", jpeg_decoder {d}" if d != "auto" else ""),
                   w, d) for d in args.jpeg_decoders for w in args.decode_workers]
    for _ in range(args.rounds):  # each round runs every row once: the rows of a round see the same host
        for b, encoder in encoders.items():  # the encoder alone on views already on its device
            sync()
            started = time.perf_counter()
            encoder.encode_device(rendered)
            sync()
            runs.setdefault(f"encoder only, batch {b}", []).append(len(rendered) / (time.perf_counter() - started))
        runs.setdefault("encoder only", []).append(max(runs[f"encoder only, batch {b}"][-1] for b in encoders))
        if job_encoder is None:  # the shard job's batch: --batch-size, or the encoder's best in the first round
            batch = batch or max(encoders, key=lambda b: runs[f"encoder only, batch {b}"][0])
            job_encoder = encoders.get(batch) or ClipEncoder(spec, device, dtype, batch)
            checks = equivalence(items[:16], plan, spec, job_encoder, device)
        for name, rate in stage_rates(items, plan, batch, device, args.jpeg_decoders[0], sync).items():
            runs.setdefault(name, []).append(rate)
        for name, workers, decoder in [*shard_rows, ("shard job inline", 0, "auto")]:
            queued: list[float] = []
            started = time.perf_counter()
            with open(os.devnull, "w") as quiet:
                out = encode_items(items, plan, job_encoder, FailureLog(False), workers=workers, progress=quiet,
                                   jpeg_decoder=decoder,
                                   on_encoded=lambda: queued.append(time.perf_counter() - started))
            seconds, views = time.perf_counter() - started, len(out.index_vectors)
            runs.setdefault(name, []).append(views / seconds)
            if queued:  # the last batch holds the rest
                marks = [(t, batch) for t in queued[:-1]] + [(queued[-1], views - batch * (len(queued) - 1))]
                if (rate := steady_rate(marks, seconds)) is not None:
                    steady.setdefault(name, []).append(rate)
                    first.setdefault(name, []).append(queued[0])
    # the three stages one after the other, each at its rate alone: what a job without overlap would reach
    runs["stages one after the other"] = [1 / (1 / e + 1 / r + 1 / d) for e, r, d in
                                          zip(runs["encoder only"], runs["readers only, in this process"],
                                              runs["render only"])]
    best = max(encoders, key=lambda b: median(runs[f"encoder only, batch {b}"]))
    rows = {name: median(rates) for name, rates in runs.items()}
    # each shard row (and the stages' bound) against the encoder alone in the same round: median, lowest, highest
    ratios = {name: [rate / alone for rate, alone in zip(rates, runs["encoder only"])]
              for name, rates in runs.items() if name.startswith(("shard job", "stages"))}
    seed_paths = [i.path for i in items[: args.seed_images]]
    rows["seed approach"] = seed_approach(seed_paths, views_per_image, spec, device)

    where = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    header = (
        f"sku_index encode, {len(items)} images x {views_per_image} views, {args.model} at "
        f"{precision_name(dtype)} on {device}{where}, shard job batch {batch} (encoder alone: best of "
        f"{args.encoder_batches}), {args.threads} threads; CPU: {cpu_summary()}"
    )
    print(header)
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds; a shard row's ratio is taken against the encoder alone in its own "
              f"round (median, and the lowest-highest of the rounds)")
    print(f"{'setup':<48} {'views/s':>9} {'vs encoder only':>16} {'vs seed approach':>17}")
    for name, rate in rows.items():
        ratio = median(ratios[name]) if name in ratios else rate / rows["encoder only"]
        spread = f" ({min(ratios[name]):.2f}-{max(ratios[name]):.2f})" if name in ratios and args.rounds > 1 else ""
        after = ""
        if steady.get(name):
            fast = median(steady[name])
            after = f"  steady {fast:9.1f} ({fast / rows['encoder only']:.2f}x), first batch at " \
                    f"{median(first[name]):.2f} s"
        print(f"{name:<48} {rate:9.1f} {ratio:16.2f} {rate / rows['seed approach']:17.2f}{spread}{after}")
    for name, value in checks.items():
        print(f"{name}: {value}")
    if args.json:
        figures = {"setup": header, "views_per_s": rows, "rounds": args.rounds, "views_per_s_by_round": runs,
                   "ratio_to_encoder_by_round": ratios,
                   "steady_views_per_s": {name: median(rates) for name, rates in steady.items()},
                   "first_batch_s": {name: median(times) for name, times in first.items()},
                   "best_encoder_batch": best, "shard_batch": batch,
                   "device": str(device), "gpu": where.strip(" ()") or None, "precision": precision_name(dtype),
                   **checks}
        Path(args.json).write_text(json.dumps(figures, indent=2))


def stage_rates(items, plan: ViewPlan, batch: int, device: torch.device, jpeg_decoder: str, sync) -> dict:
    """The shard job's stages besides the encoder, each alone in this process (views/s): the readers' work (read,
    header, decode or pass the JPEG on, view numbers, packing), then the device's (decode where it does, render) on
    the chunks the readers made. With the encoder's rate they give what a job that did the three one after the
    other would reach: 1 / (1/encoder + 1/readers + 1/render)."""
    per = items_per_chunk(batch, plan.views_per_item)
    dataset = item_chunks(items, plan, device, jpeg_decoder, per)
    started = time.perf_counter()
    chunks = [dataset[k] for k in range(len(dataset))]
    readers = time.perf_counter() - started
    render = chunk_renderer(plan, device, per)
    render(chunks[0])  # warm-up: kernels, and the renderer's work space
    sync()
    started = time.perf_counter()
    views = sum(len(render(chunk)) for chunk in chunks)
    sync()
    return {"readers only, in this process": views / readers, "render only": views / (time.perf_counter() - started)}


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
