"""Benchmark of speaker_embed, measured side by side in one run (`make bench`).

Utterance embedding (the demo corpus's utterances, `--copies` times over, per backend):
  model only       the backend's encoder on pre-loaded, pre-cut model input, in the same batches as the job
  shard job        mlprep's embed loop: read + downmix + resample + cut in a worker, batched encoding; beside the
                   whole run's rate, the steady state after the first group and when that group was queued
                   (the readers' start-up), so a short run does not pass its start-up off as the feed's speed
  shard job inline the same with reading in the encoding process (no overlap)
  1 vs 2 jobs      one job alone against two at once (one thread each), throughput ratio
Speaker step (`--utterances` random 256-dim utterance embeddings of `--speakers` speakers):
  mlprep           the vectorised group-by of the shard job + the table and matrix it writes, then the
                   per-speaker pickles (opt-out) on their own line
  seed-style loop  per speaker: read its file of utterance embeddings, normalise, average, stats,
                   write one pickle (what the seed's script does per speaker), on the same data
The speechbrain rows use a random-init ECAPA-TDNN of the hub model's size (1024 channels, 80 mels,
192-dim): the cost of the real model, without its weights. Ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlprep.devices import cpu_summary, to_host
from mlprep.failures import FailureLog
from mlprep.speaker.audio import load_audio
from mlprep.speaker.backends import load_backend
from mlprep.speaker.embed import ReaderTotals, embed_audio
from mlprep.workers import resolve_workers
from table import steady_rate

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "demo" / "speech"
OUT = REPO / "results" / "bench" / "speaker"


def corpus(copies: int) -> pd.DataFrame:
    paths = sorted(str(p) for p in DEMO.rglob("utt*.*"))
    return pd.DataFrame({"item_id": [f"c{k}/{i}" for k in range(copies) for i in range(len(paths))],
                         "path": paths * copies})


def make_backend(name: str, batch_size: int, device: str = "cpu"):
    source = None
    if name == "speechbrain":
        from mlprep.demo import write_ecapa_model

        source = OUT / "ecapa-1024"
        if not (source / "embedding_model.ckpt").exists():
            write_ecapa_model(source, channels=1024, dim=192, n_mels=80)
    return load_backend(name, torch.device(device), batch_size, source=str(source) if source else None)


def model_only(backend, frame: pd.DataFrame) -> float:
    """Seconds for the encoder alone over the job's batches (input prepared beforehand, not timed)."""
    prepared = [backend.prepare(load_audio(p, backend.sample_rate, 0.5)) for p in frame["path"]]
    groups, current, windows = [], [], 0
    for item in prepared:  # the job's grouping (mlprep.speaker.embed.embed_audio)
        current.append(item)
        windows += len(item)
        if windows >= backend.pending_factor * backend.batch_size:
            groups.append(current)
            current, windows = [], 0
    groups.append(current)
    started = time.perf_counter()
    on_device = [backend.encode_device(group) for group in groups]  # queued, as the job queues them
    to_host(on_device)  # and back to the host at the end: the encoder's time, nothing waits in between
    return time.perf_counter() - started


def shard_job(backend, frame: pd.DataFrame, workers: int, marks: list | None = None,
              readers: ReaderTotals | None = None) -> float:
    """Seconds for mlprep's embed loop over `frame`; `marks` gets (seconds since the start, utterances) for each
    group the loop queued on the model, so start-up and the steady state can be told apart (steady_rate);
    `readers` what the readers spent, by part."""
    encode, marks = backend.encode_device, marks if marks is not None else []

    def counted(windows):
        out = encode(windows)
        marks.append((time.perf_counter() - started, len(windows)))
        return out

    backend.encode_device = counted
    started = time.perf_counter()
    try:
        with open(os.devnull, "w") as quiet:
            vectors, _, _ = embed_audio(frame, backend, FailureLog(False), workers, 0.5, quiet, readers=readers)
    finally:
        del backend.encode_device  # the class's own again
    assert len(vectors) == len(frame)
    return time.perf_counter() - started


def jobs_in_parallel(backend_name: str, frame: pd.DataFrame, n_jobs: int, batch_size: int) -> float:
    """Wall time of n_jobs processes, each with one thread and its own 1/n of the utterances, started
    together once their model is loaded."""
    start_at = time.time() + 8.0
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for k in range(n_jobs):
            part = Path(tmp) / f"part{k}.parquet"
            frame.iloc[k::n_jobs].to_parquet(part)
            procs.append(subprocess.Popen([sys.executable, __file__, "--job", backend_name, str(part), str(start_at),
                                           str(batch_size)], stdout=subprocess.PIPE, text=True))
        ends = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError("a benchmark job failed")
            ends.append(float(out.split()[-1]))
    if min(ends) - start_at < 0:
        raise RuntimeError("a job started late: raise the start delay")
    return max(ends) - start_at


def run_job(backend_name: str, part: str, start_at: float, batch_size: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # what embed_shard does for a job of one thread
    torch.set_num_threads(1)
    backend = make_backend(backend_name, batch_size)
    frame = pd.read_parquet(part)
    time.sleep(max(0.0, start_at - time.time()))
    shard_job(backend, frame, 0)
    print(time.time())


def synthetic_utterances(n: int, speakers: int, dim: int, folder: Path, seed: int = 0) -> None:
    """utterances.parquet + vectors.npy: n utterance embeddings of `speakers` random speakers."""
    rng = np.random.default_rng(seed)
    speaker = rng.integers(0, speakers, n)
    spk = [f"id{s:06d}" for s in speaker]
    item = [f"vox/{s}/u{i:07d}" for i, s in enumerate(spk)]
    frame = pd.DataFrame({"speaker_key": [f"vox/{s}" for s in spk], "dataset": "vox", "speaker_id": spk,
                          "item_id": item, "path": [f"/corpus/{i}.wav" for i in item]})
    frame.sort_values("item_id").to_parquet(folder / "utterances.parquet")  # a shard job's rows: sorted by id
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    vectors = centres[speaker] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    np.save(folder / "vectors.npy", vectors[frame.sort_values("item_id").index.to_numpy()])


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_worker(mode: str, folder: str, repeat: int) -> None:
    """One kind of measurement per process, so that its peak RSS is its own; the best of `repeat` timings
    (each after a sync, into a fresh folder: the disk's write-back is the noisiest part). Prints JSON."""
    import shutil

    out = Path(folder)
    frame, vectors = pd.read_parquet(out / "utterances.parquet"), np.load(out / "vectors.npy")
    result: dict = {}
    times: dict[str, list[float]] = {}

    def timed(name: str, work) -> None:
        os.sync()
        started = time.perf_counter()
        work()
        times.setdefault(name, []).append(time.perf_counter() - started)

    if mode == "mlprep":
        import pyarrow.parquet as pq

        from mlprep.io import save_npy
        from mlprep.speaker.speakers import aggregate
        from mlprep.speaker.steps import _speakers_table, write_speaker_pickles

        aggregate(frame.iloc[:1000], vectors[:1000])  # the libraries' lazy imports, as a shard job has them
        result["input_rss_mib"] = peak_rss_mib()  # libraries + input
        made = {}

        def step() -> None:
            made["speakers"] = aggregate(frame, vectors, None, min_utterances=2, normalize="both")
            pq.write_table(_speakers_table(made["speakers"].table, made["speakers"].embeddings),
                           out / "speakers.parquet")
            save_npy(made["speakers"].embeddings, out / "speaker_embeddings.npy")

        for _ in range(repeat):
            timed("step_s", step)
            result["peak_rss_mib"] = peak_rss_mib()
            shutil.rmtree(out / "pkl", ignore_errors=True)
            timed("pickles_s", lambda: write_speaker_pickles(made["speakers"].table, made["speakers"].embeddings,
                                                             out / "pkl"))
        result["speakers"] = len(made["speakers"].table)
    else:  # the seed's per-speaker loop over per-speaker files of utterance embeddings
        files = out / "per_speaker"
        files.mkdir(exist_ok=True)
        groups = frame.groupby("speaker_key").indices
        items, paths = frame["item_id"].tolist(), frame["path"].tolist()
        listing = {}  # what the seed gets from listing a speaker's folder (not timed)
        for key, rows in groups.items():  # the input files (not timed)
            np.save(files / f"{key.split('/')[1]}.npy", vectors[rows])
            listing[key] = ([items[r] for r in rows], [paths[r] for r in rows])
        del vectors

        def loop() -> None:
            (out / "seed_pkl").mkdir()
            for key in groups:
                dataset, speaker_id = key.split("/")
                utts = np.load(files / f"{speaker_id}.npy")
                utts = utts / np.linalg.norm(utts, axis=1, keepdims=True)
                emb = utts.mean(axis=0)
                emb = emb / np.linalg.norm(emb)
                record = {"embedding": emb, "dataset": dataset, "speaker_id": speaker_id,
                          "num_utterances": len(utts), "failed_utterances": 0, "utterance_list": listing[key][0],
                          "original_paths": listing[key][1], "embedding_dim": len(emb),
                          "embedding_stats": {"mean": float(emb.mean()), "std": float(emb.std()),
                                              "min": float(emb.min()), "max": float(emb.max())}}
                with open(out / "seed_pkl" / f"{dataset}_{speaker_id}.pkl", "wb") as handle:
                    pickle.dump(record, handle)

        for _ in range(repeat):
            shutil.rmtree(out / "seed_pkl", ignore_errors=True)
            timed("step_s", loop)
        result["speakers"] = len(groups)
    result.update({name: min(values) for name, values in times.items()})
    result["all_timings"] = times
    print(json.dumps(result))


def speaker_step(mode: str, folder: Path, repeat: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--step", mode, str(folder), str(repeat)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"speaker step ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10, help="times each demo utterance is embedded")
    parser.add_argument("--backends", nargs="+", default=["resemblyzer", "speechbrain"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--utterances", type=int, default=1_000_000)
    parser.add_argument("--speakers", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--parts", nargs="+", choices=["utterances", "step"], default=["utterances", "step"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda: a GPU host runs the model rows only")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="reader workers of the shard job rows")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--job", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="speaker step timings, best of")
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        run_job(args.job[0], args.job[1], float(args.job[2]), int(args.job[3]))
        return
    if args.step:
        step_worker(args.step[0], args.step[1], int(args.step[2]))
        return

    OUT.mkdir(parents=True, exist_ok=True)
    frame = corpus(args.copies)
    threads = min(2, os.cpu_count() or 1)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    print(f"speaker_embed benchmark on {cpu_summary()}{f', {gpu}' if gpu else ''}, device {args.device}, fp32, "
          f"{threads} torch threads, batch {args.batch_size}")
    figures: dict = {"utterances": len(frame), "device": args.device, "gpu": gpu}
    if "utterances" in args.parts:
        print(f"utterance embedding: {len(frame)} utterances ({len(frame) // args.copies} demo files x {args.copies})")
        print(f"{'backend':<12} {'setup':<22} {'utt/s':>8} {'vs model only':>14}")
    for name in args.backends if "utterances" in args.parts else []:
        torch.set_num_threads(threads)
        backend = make_backend(name, args.batch_size, args.device)
        model_only(backend, frame.iloc[:20])  # warm-up
        rows = {"model only": len(frame) / model_only(backend, frame)}
        steady, first = {}, {}
        readers = ReaderTotals()
        auto = resolve_workers("auto", torch.device(args.device), threads)  # what a job of these threads runs
        for w in dict.fromkeys([*args.workers, auto, 0]):
            setup, marks = job_setup(w), []
            seconds = shard_job(backend, frame, w, marks, readers)
            rows[setup], steady[setup], first[setup] = len(frame) / seconds, steady_rate(marks, seconds), marks[0][0]
        # the readers' CPU an utterance, by part, over every shard job row: what R readers could supply
        per_utt = {part: round(s / readers.utterances * 1000, 3) for part, s in readers.seconds.items()}
        print(f"{name:<12} readers' CPU an utterance: "
              f"{', '.join(f'{part} {ms} ms' for part, ms in per_utt.items())}; {readers.resampled} of "
              f"{readers.utterances} resampled; 1 reader ~{1000 / sum(per_utt.values()):.0f} utt/s")
        for setup, rate in rows.items():
            after = f"  steady {steady[setup]:8.1f} ({steady[setup] / rows['model only']:.2f}x), first group at " \
                    f"{first[setup]:.2f} s" if steady.get(setup) else ""
            print(f"{name:<12} {setup:<22} {rate:8.1f} {rate / rows['model only']:14.2f}{after}")
        print(f"{name:<12} decode_workers: auto runs the {job_setup(auto)} row here")
        figures[name] = {"utt_per_s": rows, "auto_setup": job_setup(auto), "steady_utt_per_s": steady,
                         "first_group_s": first,
                         "reader_ms_per_utt": per_utt, "resampled_share": readers.resampled / readers.utterances}
        if gpu:
            continue
        if threads > 1:  # the model on one core, the reader on the other: no core shared
            torch.set_num_threads(1)
            single = {"model only, 1 thread": len(frame) / model_only(backend, frame),
                      "job, 1 thread + 1 worker": len(frame) / shard_job(backend, frame, 1)}
            for setup, rate in single.items():
                print(f"{name:<12} {setup:<22} {rate:8.1f} {rate / single['model only, 1 thread']:14.2f}")
            rows.update(single)
        one = jobs_in_parallel(name, frame, 1, args.batch_size)
        two = jobs_in_parallel(name, frame, 2, args.batch_size)
        print(f"{name:<12} 1 job {one:.2f} s, 2 jobs at once {two:.2f} s (1 thread each): throughput x{one / two:.2f}")
        figures[name].update({"one_job_s": one, "two_jobs_s": two})

    if "step" in args.parts:
        speaker_step_table(args, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def job_setup(workers: int) -> str:
    """A shard job row's name: its reader workers, or inline."""
    return f"shard job ({workers} worker{'s' * (workers > 1)})" if workers else "shard job inline"


def speaker_step_table(args, figures: dict) -> None:
    print(f"speaker step: {args.utterances:,} utterance embeddings (dim {args.dim}) of {args.speakers:,} speakers, "
          f"best of {args.repeat}")
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        synthetic_utterances(args.utterances, args.speakers, args.dim, Path(tmp))
        ours = speaker_step("mlprep", Path(tmp), args.repeat)
        seed = speaker_step("seed", Path(tmp), args.repeat)
    print(f"  mlprep group-by + table + matrix  {ours['step_s']:7.2f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(before the step, libraries and input {ours['input_rss_mib']:.0f} MiB)")
    print(f"  mlprep per-speaker pickles        {ours['pickles_s']:7.2f} s")
    print(f"  seed-style loop                   {seed['step_s']:7.2f} s")
    print(f"  speed-up: step x{seed['step_s'] / ours['step_s']:.1f}, "
          f"step + pickles x{seed['step_s'] / (ours['step_s'] + ours['pickles_s']):.1f}")
    figures["speaker_step"] = {"mlprep": ours, "seed": seed}


if __name__ == "__main__":
    main()
