"""End to end on small data: the whole workflow against a one-process script, and where they cross.

For each size the same inputs go through
  workflow   `snakemake --cores 2` on one pipeline (its manifest, shard jobs, gather, checks, eval)
  script     one Python process doing the seed's loop (sku_index: PIL augmentations and one view per
             fp32 model call, then a FAISS index; video_frames: OpenCV reading every frame, then a pkl)
timed from the command's start to its exit, imports and model build included. Each workflow job's
fixed cost is read from its stats (`startup_s`: process start to its first finished item). A line
fitted through each column gives the size from which the workflow is faster end to end.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mlprep.config import only

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started


def run_workflow(workdir: Path, config: dict) -> tuple[float, list[float]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    wall = timed([str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                  "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--quiet"])
    startups = [json.loads(p.read_text())["startup_s"] for p in sorted((workdir / "results").rglob("*stats.json"))]
    return wall, [s for s in startups if s is not None]


# ---------------------------------------------------------------- the one-process scripts


def seed_sku_script(sku_data: str, images_dir: str, views: int, out: str) -> None:
    """The seed's loop: every view augmented with PIL/torchvision and encoded alone, fp32; then a Flat index."""
    import faiss
    import open_clip
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO / "bench"))
    from sku_encode import seed_augment

    torch.set_num_threads(2)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    augment = seed_augment()
    vectors = []
    with torch.inference_mode():
        for sku in json.loads(Path(sku_data).read_text()):
            for name in sku["images"]:
                image = Image.open(Path(images_dir) / name).convert("RGB")
                for k in range(views):
                    view = image if k == 0 else augment(image)
                    vectors.append(model.encode_image(preprocess(view).unsqueeze(0))[0].numpy())
    matrix = np.stack(vectors).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    faiss.write_index(index, out)


def naive_video_script(pairs: str, clips_dir: str, out: str) -> None:
    """The seed's loop: OpenCV reads every frame of every clip, keeps 16, resizes; then one pkl."""
    import cv2

    sys.path.insert(0, str(REPO / "bench"))
    from video_frames import naive_frames

    cv2.setNumThreads(1)
    records = [{"id": pair["clip"], "text": pair["text"],
                "frames": np.stack(naive_frames(Path(clips_dir) / pair["clip"], 16))}
               for pair in json.loads(Path(pairs).read_text())]
    with open(out, "wb") as handle:
        pickle.dump(records, handle)


# ---------------------------------------------------------------- the comparison


def crossover(sizes: list[int], flow: list[float], script: list[float]) -> tuple[str, float, float, float, float]:
    """Lines wall = a + b * n through each column; the size where they meet."""
    fa_b, fa_a = np.polyfit(sizes, flow, 1)
    sa_b, sa_a = np.polyfit(sizes, script, 1)
    if sa_b <= fa_b:
        return "never (the workflow's per-item cost is not lower)", fa_a, fa_b, sa_a, sa_b
    n = (fa_a - sa_a) / (sa_b - fa_b)
    return (f"{max(0.0, n):.0f}" if n > 0 else "always"), fa_a, fa_b, sa_a, sa_b


def report(name: str, unit: str, sizes, flow, script, startups) -> dict:
    where, fa, fb, sa, sb = crossover(sizes, flow, script)
    print(f"\n{name}")
    print(f"{unit:>8} {'workflow s':>11} {'script s':>9} {'workflow/script':>16} {'job startup s (min-max)':>24}")
    for n, f, s, st in zip(sizes, flow, script, startups):
        span = f"{min(st):.2f}-{max(st):.2f}" if st else "-"
        print(f"{n:>8} {f:11.1f} {s:9.1f} {f / s:16.2f} {span:>24}")
    print(f"fit: workflow {fa:.1f} s + {fb:.3f} s per {unit.rstrip('s')}, script {sa:.1f} s + {sb:.3f} s; "
          f"the workflow is faster from about {where} {unit}")
    return {"sizes": sizes, "workflow_s": flow, "script_s": script, "job_startup_s": startups,
            "fit": {"workflow": [fa, fb], "script": [sa, sb]}, "crossover": where}


def bench_sku(sizes: list[int], work: Path) -> dict:
    from mlprep.demo import write_catalog

    flow, script, startups = [], [], []
    for n in sizes:
        data = work / f"sku{n}"
        sku_data = write_catalog(data / "data", n // 2, 2)
        config = {"device": "cpu", **only("sku_index"),
                  "sku_index": {"sku_data": str(sku_data), "images_dir": str(data / "data" / "images"), "shards": 1,
                                "eval": {"queries_per_image": 0}, "confusable_pairs": 0,
                                "model": {"family": "open_clip", "name": "ViT-B-32"}}}  # the script's model
        wall, jobs = run_workflow(data / "flow", config)
        flow.append(wall)
        startups.append(jobs)
        script.append(timed([sys.executable, __file__, "--sku-script", str(sku_data), str(data / "data" / "images"),
                             str(data / "script.faiss")]))
    return report("sku_index: 6 views per image (1 + 5 augmented), ViT-B-32 random weights; workflow at "
                  "precision auto, one shard; script fp32, one view per call", "images", sizes, flow, script, startups)


def bench_video(sizes: list[int], work: Path) -> dict:
    from mlprep.demo import write_clip

    sources = ["testsrc", "testsrc2", "smptebars", "rgbtestsrc"]
    clips = work / "clips"
    distinct = [write_clip(clips / f"c{i}.mp4", 10, 30, (640, 360), gop=30, source=sources[i]) for i in range(4)]
    flow, script, startups = [], [], []
    for n in sizes:
        data = work / f"video{n}"
        (data / "clips").mkdir(parents=True, exist_ok=True)
        pairs = []
        for i in range(n):
            target = data / "clips" / f"clip{i:04d}.mp4"
            if not target.exists():
                target.symlink_to(distinct[i % len(distinct)])
            pairs.append({"clip": target.name, "text": f"clip {i}"})
        (data / "pairs.json").write_text(json.dumps(pairs))
        config = {"device": "cpu", **only("video_frames"),
                  "video_frames": {"pairs": str(data / "pairs.json"), "clips_dir": str(data / "clips"),
                                   "split_mode": "all_train", "shards": {"train": 2}}}
        wall, jobs = run_workflow(data / "flow", config)
        flow.append(wall)
        startups.append(jobs)
        script.append(timed([sys.executable, __file__, "--video-script", str(data / "pairs.json"),
                             str(data / "clips"), str(data / "script.pkl")]))
    return report("video_frames: 10 s clips, 640x360, 30 fps, 16 frames to 256x160; workflow 2 shards "
                  "(decord), script OpenCV reading every frame", "clips", sizes, flow, script, startups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sku-sizes", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--video-sizes", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--sku-script", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--video-script", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sku_script:
        return seed_sku_script(*args.sku_script[:2], 6, args.sku_script[2])
    if args.video_script:
        return naive_video_script(*args.video_script)

    import torch

    from mlprep.devices import cpu_summary, precision_name, select_precision

    print(f"end to end, {cpu_summary()}; workflow precision auto = "
          f"{precision_name(select_precision('auto', torch.device('cpu')))}")
    with tempfile.TemporaryDirectory(prefix="mlprep-e2e-") as tmp:
        figures = {"cpu": cpu_summary(), "sku_index": bench_sku(args.sku_sizes, Path(tmp)),
                   "video_frames": bench_video(args.video_sizes, Path(tmp))}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
