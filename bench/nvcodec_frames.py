"""Another GPU decoder that keeps frames on the device, beside the pipeline's own (PyAV's NVDEC, kept decoders).

NVIDIA's PyNvVideoCodec (`SimpleDecoder`, frames handed to torch through DLPack, each thread's decoder reused
across clips with `reconfigure_decoder`) against the pipeline's own CPU decoding on all cores and its NVDEC path,
side by side in one run, on bench/video_frames.py's two kinds of clip (short 640x360 clips, keyframe every second;
1080p clips with a keyframe every 10 s), 16 uniformly spaced frames a clip:
  CPU         bench/video_frames.py's extract shard processes, one per core (PyAV; decord too where installed)
  pyav+cuda   one extract job of 4 threads: 4 decode lanes, each keeping its NVDEC decoder across clips
  nvcodec xT  T threads of one process, each with its own decoder, frames decoded at the pipeline's indices as
              RGB (NVIDIA's conversion) and resized to 256x160 on the device (OpenCV's area resize, as two
              matrix products), kept there; clips per second
and how far its frames are from the CPU's: at full size, against PyAV's frames of the same indices (the colour
conversion and frame order), and after the resize, against the extract job's frames (the resize too).
Where PyNvVideoCodec cannot be imported (no NVIDIA driver: its import needs libnvidia-encode) or there is no GPU,
the figures say why and only the CPU rows are measured: that is the dry run on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

from mlprep.video.decode import extract_clip, probe, read_pyav, uniform_indices  # noqa: E402
from video_frames import clip_kinds, make_clips, shards_in_parallel  # noqa: E402

NUM_FRAMES, WIDTH, HEIGHT = 16, 256, 160


def nvcodec_module():
    """(PyNvVideoCodec, '') where it can decode here, else (None, why not)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device"
        torch.zeros(1, device="cuda")  # torch's (primary) context first: the decoder's frames come into it
        import PyNvVideoCodec as nvc
    except Exception as err:  # noqa: BLE001 - its import fails without NVIDIA's driver libraries
        return None, f"{type(err).__name__}: {err}"[:300]
    return nvc, ""


class ClipDecoder:
    """One thread's decoder: made on its first clip, reconfigured for each next one (no new decoder a clip)."""

    def __init__(self, nvc, width: int, height: int):
        self.nvc, self.width, self.height = nvc, width, height
        self.decoder = None

    def frames(self, path: Path):
        """The clip's NUM_FRAMES uniformly spaced frames, uint8 [n, H, W, 3] RGB on the GPU, full size."""
        import torch

        if self.decoder is None:
            self.decoder = self.nvc.SimpleDecoder(str(path), gpu_id=0, use_device_memory=True,
                                                  output_color_type=self.nvc.OutputColorType.RGB,
                                                  max_width=self.width, max_height=self.height)
        else:
            torch.cuda.current_stream().synchronize()
            self.decoder.reconfigure_decoder(str(path))
        indices = uniform_indices(0, len(self.decoder) - 1, NUM_FRAMES)
        wanted = np.unique(indices)
        decoded = self.decoder.get_batch_frames_by_index(wanted.tolist())
        frames = torch.stack([torch.from_dlpack(frame) for frame in decoded])  # copied before the next call
        return frames[torch.as_tensor(np.searchsorted(wanted, indices), device=frames.device)]


def area_weights(src: int, dst: int):
    """[dst, src] float32: OpenCV's INTER_AREA downscale along one axis (what the extract job's resize does):
    each output pixel the mean of the input span it covers, the pixels at its ends weighted by their overlap."""
    import torch

    if dst > src:
        raise ValueError(f"area weights downscale only ({src} -> {dst})")
    scale = src / dst
    edges = torch.arange(dst + 1, dtype=torch.float64) * scale
    pixel = torch.arange(src, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(edges[1:, None], pixel + 1) - torch.maximum(edges[:-1, None], pixel)).clamp(min=0)
    return (overlap / scale).float()


def resized(frames):
    """uint8 [n, H, W, 3] -> uint8 [n, HEIGHT, WIDTH, 3] on the frames' device, OpenCV's INTER_AREA as two
    matrix products (equal to cv2.resize's values on the pipeline's sizes: tests/test_device_check.py)."""
    import torch

    rows = area_weights(frames.shape[1], HEIGHT).to(frames.device)
    cols = area_weights(frames.shape[2], WIDTH).to(frames.device)
    out = torch.einsum("yi,nijc,xj->nyxc", rows, frames.float(), cols)
    return out.round().clamp(0, 255).to(torch.uint8)


def frame_differences(nvc, path: Path) -> dict:
    """NVIDIA's RGB frames against PyAV's at the same indices (full size), and resized against the extract job's."""
    info = probe(path)
    indices = uniform_indices(0, info.n_frames - 1, NUM_FRAMES)
    wanted = np.unique(indices)
    cpu_full = read_pyav(path, wanted, info)[np.searchsorted(wanted, indices)]
    cpu_small = extract_clip(path, NUM_FRAMES, WIDTH, HEIGHT, "pyav").frames
    decoder = ClipDecoder(nvc, info.width, info.height)
    gpu = decoder.frames(path)
    full = gpu.cpu().numpy().astype(np.int16)
    small = resized(gpu).cpu().numpy().astype(np.int16)
    counts = {"nvcodec frames": len(decoder.decoder), "pyav frames": info.n_frames}  # the same indices if equal
    if full.shape != cpu_full.shape:
        return {**counts, "shape": list(full.shape), "cpu shape": list(cpu_full.shape)}
    diff, small_diff = np.abs(full - cpu_full), np.abs(small - cpu_small)
    return {**counts, "full size max abs diff": int(diff.max()), "full size mean abs diff": round(float(diff.mean()), 3),
            "full size share of values off by more than 2": round(float((diff > 2).mean()), 5),
            "resized max abs diff": int(small_diff.max()), "resized mean abs diff": round(float(small_diff.mean()), 3)}


def nvcodec_rate(nvc, paths: list[Path], threads: int) -> float:
    """Clips per second for `threads` threads, each with its own decoder, frames decoded and resized on the GPU."""
    import torch

    info = probe(paths[0])
    kept, errors = [0] * threads, []

    def work(k: int) -> None:
        try:
            decoder = ClipDecoder(nvc, info.width, info.height)
            for path in paths[k::threads]:
                resized(decoder.frames(path))
                kept[k] += 1
        except Exception as err:  # noqa: BLE001 - said below, with the thread's clips
            errors.append(f"thread {k}: {type(err).__name__}: {err}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError("; ".join(errors)[:500])
    return sum(kept) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="CPU extract shard processes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8], help="nvcodec decoder threads")
    parser.add_argument("--copies", type=int, default=2, help="times each distinct clip is decoded")
    parser.add_argument("--small", action="store_true", help="small short clips (a dry run)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    folder = REPO / "results" / "bench" / "video"
    folder.mkdir(parents=True, exist_ok=True)
    nvc, why = nvcodec_module()
    cpu_backends = ["decord", "pyav"] if importlib.util.find_spec("decord") else ["pyav"]
    figures: dict = {"nvcodec": "available" if nvc else f"unavailable: {why}", "kinds": {}}
    print("PyNvVideoCodec:", figures["nvcodec"], flush=True)
    for kind, spec in clip_kinds(args.small).items():
        paths = make_clips(folder, copies=args.copies, **spec)
        row: dict = {"clips": len(paths)}
        for backend in cpu_backends:
            row[f"{backend} x{args.processes} clips/s"] = len(paths) / shards_in_parallel(paths, args.processes,
                                                                                          backend)
        if nvc is not None:
            lanes = shards_in_parallel(paths, 1, "pyav+cuda", threads=4)
            row["pyav+cuda 1 job, 4 lanes clips/s"] = len(paths) / lanes
            row.update(frame_differences(nvc, paths[0]))
            nvcodec_rate(nvc, paths[:1], 1)  # the CUDA context and the decoder library loaded, outside the timing
            for threads in args.threads:
                try:
                    row[f"nvcodec x{threads} threads clips/s"] = nvcodec_rate(nvc, paths, threads)
                except Exception as err:  # noqa: BLE001 - one thread count's failure is a figure too
                    row[f"nvcodec x{threads} threads error"] = str(err)[:300]
        figures["kinds"][kind] = row
        print(kind, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
