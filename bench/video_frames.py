"""Benchmark of the video_frames extract job, measured side by side in one run (`make bench`).

Clips: 60 s, 640x360, 30 fps, a keyframe every second (made once with the bundled ffmpeg and
cached under results/bench/). Rows, seconds per video over the same clips:
  decode only        decord get_batch of the same 16 indices, no resize, no write: the floor
  extract job        mlprep's shard loop: probe, decode in the watchdog process, resize, pkl write
  naive (seed)       OpenCV reading every frame sequentially, then keeping 16
and the throughput of two extract shards on two cores against one shard doing all the clips,
beside the same scaling of the bare decode-only loop (the machine's own limit for this work), and one job given
`--threads` threads (all cores by default) decoding that many clips at once (its lanes, one codec thread each)
against the same job decoding one clip at a time with that many codec threads.

`--nvdec` instead compares, on a GPU host, CPU decoding on all its cores (one extract shard process per
core, decord and ffmpeg) with NVDEC (ffmpeg `-hwaccel cuda`, `--nvdec-processes` shards at once, and one shard job
of that many threads: its decode lanes) for two kinds of clip: short 640x360 clips (keyframe every second) and
1080p clips with a keyframe every 10 s; clips per second over all processes, and the largest pixel difference
between NVDEC's frames and the CPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlprep.demo import write_clip  # noqa: E402
from mlprep.failures import FailureLog  # noqa: E402
from mlprep.video.decode import probe, uniform_indices  # noqa: E402
from mlprep.video.extract import ExtractSettings, extract_items, write_pkl  # noqa: E402
from mlprep.video.pairs import ClipItem  # noqa: E402


def make_clips(folder: Path, n_distinct: int, copies: int, seconds: int, size=(640, 360), gop: int = 30) -> list[Path]:
    sources = ["testsrc", "testsrc2", "smptebars", "rgbtestsrc"]
    paths = []
    for i in range(n_distinct):
        path = folder / f"clip{i}_{seconds}s_{size[1]}p_g{gop}.mp4"
        if not path.exists():
            if has_ffmpeg():
                write_clip(path, seconds, 30, size, gop=gop, source=sources[i % len(sources)])
            else:
                pyav_clip(path, seconds, 30, size, gop)
        paths.append(path)
    return [p for _ in range(copies) for p in paths]


def pyav_clip(path: Path, seconds: int, fps: int, size: tuple[int, int], gop: int) -> Path:
    """A synthetic H.264 clip encoded by PyAV's own FFmpeg (libx264): for hosts without an ffmpeg binary.
    One second of moving pattern is drawn and looped (drawing 1080p frames costs more than encoding them)."""
    import av
    import numpy as np

    width, height = size
    x = np.linspace(0, 4 * np.pi, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 4 * np.pi, height, dtype=np.float32)[:, None]
    loop = []
    for k in range(fps):
        t = 2 * np.pi * k / fps
        rgb = np.stack(np.broadcast_arrays(np.sin(x + t) * np.cos(y), np.sin(x * 0.5 - t + 0 * y),
                                           np.cos(y + 2 * t) + 0 * x), axis=-1)
        loop.append(av.VideoFrame.from_ndarray(((rgb + 1) * 127).astype(np.uint8), format="rgb24"))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(gop),
                                                              "keyint_min": str(gop)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(int(seconds * fps)):
            out.mux(stream.encode(loop[k % fps]))
        out.mux(stream.encode(None))
    return path


def has_ffmpeg() -> bool:
    from mlprep.video.decode import ffmpeg_exe

    try:
        return bool(ffmpeg_exe())
    except ImportError:  # no ffmpeg on PATH and no imageio-ffmpeg
        return False


def decoder_settings(name: str) -> ExtractSettings:
    """`decord`, `pyav`, `ffmpeg`, or `pyav+cuda` / `ffmpeg+cuda` (NVDEC through PyAV or ffmpeg)."""
    backend, _, hwaccel = name.partition("+")
    return ExtractSettings(16, 256, 160, backend, hwaccel or None, 300.0, 1)


def clip_kinds(small: bool = False) -> dict[str, dict]:
    """The two kinds of clip the GPU decoders are measured on (make_clips' arguments): short 640x360 clips with a
    keyframe every second and 1080p clips with one every 10 s; `small`, a dry run's: the same steps, no time."""
    if small:
        return {"320x180, 2 s, keyframe every 1 s": dict(n_distinct=2, seconds=2, size=(320, 180), gop=30),
                "640x360, 3 s, keyframe every 3 s": dict(n_distinct=1, seconds=3, size=(640, 360), gop=90)}
    return {"640x360, 10 s, keyframe every 1 s": dict(n_distinct=4, seconds=10, size=(640, 360), gop=30),
            "1920x1080, 12 s, keyframe every 10 s": dict(n_distinct=2, seconds=12, size=(1920, 1080), gop=300)}


def nvdec_comparison(folder: Path, processes: int, nvdec_processes: int, copies: int, small: bool = False) -> dict:
    """Clips per second of CPU decoding on `processes` cores against NVDEC, for short and for 1080p long-GOP
    clips, and how far NVDEC's frames are from ffmpeg's CPU frames."""
    import numpy as np

    from mlprep.video.decode import extract_clip

    kinds = clip_kinds(small)
    backends = ["pyav", "ffmpeg"] if has_ffmpeg() else ["pyav"]
    decoders = [(b, processes) for b in ["decord", *backends]] + [(f"{b}+cuda", nvdec_processes) for b in backends]
    out = {}
    for kind, spec in kinds.items():
        paths = make_clips(folder, copies=copies, **spec)
        row = {"clips": len(paths)}
        for backend in backends:  # NVDEC's frames against the same backend's CPU frames
            cpu = extract_clip(paths[0], 16, 256, 160, backend)
            gpu = extract_clip(paths[0], 16, 256, 160, backend, hwaccel="cuda")
            row[f"{backend} nvdec note"] = gpu.note
            row[f"{backend} nvdec max abs diff"] = int(np.abs(gpu.frames.astype(int) - cpu.frames).max())
        for decoder, n in decoders:
            row[f"{decoder} x{n} clips/s"] = len(paths) / shards_in_parallel(paths, n, decoder)
        for backend in backends:  # one job of as many threads: that many NVDEC decodes at once, in its lanes
            row[f"{backend}+cuda 1 job, {nvdec_processes} lanes clips/s"] = len(paths) / shards_in_parallel(
                paths, 1, f"{backend}+cuda", threads=nvdec_processes)
        out[kind] = row
        print(kind, json.dumps(row))
    return out


def decode_only(paths: list[Path], num_frames: int) -> float:
    import decord

    started = time.perf_counter()
    for path in paths:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        reader.get_batch(uniform_indices(0, len(reader) - 1, num_frames).tolist()).asnumpy()
    return (time.perf_counter() - started) / len(paths)


def naive_frames(path: Path, num_frames: int):
    """The seed's way: OpenCV reads every frame, then num_frames uniformly spaced ones are kept, RGB, 256x160."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    keep = uniform_indices(0, len(frames) - 1, num_frames)
    return [cv2.resize(cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB), (256, 160)) for i in keep]


def naive_opencv(paths: list[Path], num_frames: int) -> float:
    import cv2

    cv2.setNumThreads(1)
    started = time.perf_counter()
    for path in paths:
        naive_frames(path, num_frames)
    return (time.perf_counter() - started) / len(paths)


def extract_job(paths: list[Path], settings: ExtractSettings, out: Path) -> float:
    items = [ClipItem(f"c{i}", "text", p.name, str(p), None, None, "train", 0) for i, p in enumerate(paths)]
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        records, _ = extract_items(items, settings, FailureLog(False), progress=quiet)
    write_pkl(records, out)
    return (time.perf_counter() - started) / len(paths)


def shards_in_parallel(paths: list[Path], n_shards: int, backend: str, threads: int = 1) -> float:
    """Wall time for n_shards extract processes (one per shard, each a job of `threads` threads) to do all the clips.

    The processes import their libraries first and start together at an agreed time, so the
    figure is the shards' work, not interpreter start-up (which a real shard of hundreds of clips
    amortises).
    """
    chunks = [paths[i::n_shards] for i in range(min(n_shards, len(paths)))]
    start_at = time.time() + 3.0 + 0.25 * n_shards  # the processes import their libraries first
    procs = [
        subprocess.Popen([sys.executable, __file__, "--start-at", str(start_at), "--worker-threads", str(threads),
                          "--worker", backend, *map(str, chunk)], stdout=subprocess.PIPE, text=True)
        for chunk in chunks
    ]
    ends = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("a benchmark shard failed")
        ends.append(float(out.split()[-1]))
    return max(ends) - start_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4, help="distinct 60 s clips to make")
    parser.add_argument("--copies", type=int, default=4, help="times each clip is processed")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--backend", default="decord")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one-job lanes row")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--nvdec", action="store_true", help="CPU decoders on all cores against NVDEC (a GPU host)")
    parser.add_argument("--processes", type=int, default=os.cpu_count(), help="--nvdec: CPU shard processes")
    parser.add_argument("--nvdec-processes", type=int, default=4, help="--nvdec: NVDEC shard processes at once")
    parser.add_argument("--small", action="store_true", help="--nvdec: small short clips (a dry run)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = decoder_settings(args.backend if not args.worker else args.worker[0])
    if args.worker:
        time.sleep(max(0.0, args.start_at - time.time()))
        if args.worker[0] == "decode-only":
            decode_only([Path(p) for p in args.worker[1:]], 16)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                extract_job([Path(p) for p in args.worker[1:]], replace(settings, threads=args.worker_threads),
                            Path(tmp) / "shard.pkl")
        print(time.time())
        return

    folder = REPO / "results" / "bench" / "video"
    folder.mkdir(parents=True, exist_ok=True)
    if args.nvdec:
        figures = nvdec_comparison(folder, args.processes, args.nvdec_processes, args.copies, args.small)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return
    paths = make_clips(folder, args.clips, args.copies, args.seconds)
    info = probe(paths[0])
    decode_only(paths[:1], 16)  # warm the page cache and the libraries
    rows = {
        "decode only": decode_only(paths, 16),
        "extract job": extract_job(paths, settings, folder / "bench.pkl"),
        "naive (seed)": naive_opencv(paths, 16),
    }
    threaded = {name: extract_job(paths, replace(settings, threads=args.threads, lanes=n), folder / "bench.pkl")
                for name, n in (("clips at once", args.threads), ("one clip at a time", 1))}
    one = shards_in_parallel(paths, 1, settings.backend)
    two = shards_in_parallel(paths, 2, settings.backend)
    floor_one = shards_in_parallel(paths, 1, "decode-only")
    floor_two = shards_in_parallel(paths, 2, "decode-only")
    print(f"video_frames extract, {len(paths)} clips of {args.seconds} s, {info.width}x{info.height} "
          f"{info.fps:g} fps, keyframe every 1 s, backend {settings.backend}, 16 frames at 256x160")
    print(f"{'setup':<14} {'s/video':>8} {'vs decode only':>15} {'speed-up vs naive':>18}")
    for name, seconds in rows.items():
        print(f"{name:<14} {seconds:8.3f} {seconds / rows['decode only']:15.2f} "
              f"{rows['naive (seed)'] / seconds:18.2f}")
    print(f"extract job: 1 shard {one:.2f} s, 2 shards on 2 cores {two:.2f} s -> throughput x{one / two:.2f}")
    lanes, single = threaded["clips at once"], threaded["one clip at a time"]
    print(f"one job of {args.threads} threads: {args.threads} clips at once {lanes:.3f} s/video, one clip at a time "
          f"with {args.threads} codec threads {single:.3f} s/video -> throughput x{single / lanes:.2f}")
    print(f"decode only: 1 process {floor_one:.2f} s, 2 processes {floor_two:.2f} s -> throughput "
          f"x{floor_one / floor_two:.2f} (what this machine's two cores give a decode-bound loop)")
    if args.json:
        figures = {"s_per_video": rows, "one_job": {"threads": args.threads, "s_per_video": threaded},
                   "one_shard_s": one, "two_shards_s": two, "decode_only_one_s": floor_one,
                   "decode_only_two_s": floor_two}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    os.remove(folder / "bench.pkl")


if __name__ == "__main__":
    main()
