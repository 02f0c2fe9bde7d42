"""DAG cost at scale: a million items in ten thousand shards, against a bare Snakefile of the same job count.

For each size and pipeline it builds a synthetic catalog on disk (files are symlinks to a few real
demo files: hard links stop at 65,000 per file), then measures, each in a fresh Snakemake process:
  dry-run       `snakemake -n` in a fresh work folder (the catalog is read for the first time)
  dry-run again the same, with the catalog cache and the shard lists in place
  no-op rerun   `snakemake -n` when every output exists and is up to date (outputs faked, then --touch):
                the same DAG work as a real run that finds nothing to do
  job start-up  what a cluster node pays before its shard job starts: Snakemake in remote mode,
                parsing the workflow and building the one-job DAG (dry-run of that job)
and the same for the bare Snakefile: N one-input shard jobs and a merge. Peak RSS is the largest
process's. Ratios are to the bare DAG measured in the same run.

    .venv/bin/python bench/dag_scale.py                              # 100k/1k and 1M/10k, every pipeline
    .venv/bin/python bench/dag_scale.py --sizes 2000:20 --check      # small, and assert the job counts (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlprep.config import only  # noqa: E402
from mlprep.sharding import ShardId  # noqa: E402

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
DIRS = 1000  # items spread over this many folders, as real data sets are

BARE = """
N = int(config["count"])

rule all:
    input: "merged.txt"

rule merge:
    input: expand("out/{i}.txt", i=range(N))
    output: "merged.txt"
    shell: "touch {output}"

rule shard:
    input: "in/{i}.txt"
    output: "out/{i}.txt"
    shell: "cp {input} {output}"
"""


def run(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of the largest process so far, output)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, rss, proc.stdout + proc.stderr


def measured(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run `cmd` from a helper process, so that its peak RSS is its own (a process's ru_maxrss of its
    children only ever grows)."""
    helper = [sys.executable, __file__, "--measure", json.dumps({"cmd": cmd, "cwd": str(cwd)})]
    proc = subprocess.run(helper, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    data = json.loads(proc.stdout.splitlines()[-1])
    return data["seconds"], data["rss_mib"], data["output"]


# ---------------------------------------------------------------- synthetic data


def sources() -> list[Path]:
    return sorted((REPO / "resources" / "demo" / "sku" / "images").glob("*.jpg"))


def make_sku(folder: Path, items: int) -> Path:
    data = folder / f"sku_{items}.json"
    if data.exists():
        return data
    images, files = folder / "images", sources()
    skus = []
    for s in range(items // 5):
        names = []
        for k in range(5):
            n = s * 5 + k
            rel = f"d{n % DIRS:04d}/sku{s:07d}_{k}.jpg"
            path = images / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(files[n % len(files)])
            names.append(rel)
        skus.append({"sku_id": f"sku{s:07d}", "name": f"Product {s}", "category": "snacks", "images": names})
    data.write_text(json.dumps(skus))
    return data


def make_sku_tars(folder: Path, items: int, tars: int) -> Path:
    """The same catalog shape with its images as webdataset tars (img2dataset's layout: `{key}.jpg` members,
    keys numbered per tar), named by key in sku_data.json. Members are 70 KB, more than the index's read window,
    so that every header costs its own read as with real photos; their data is left as holes (sparse files)."""
    import tarfile

    data = folder / f"sku_{items}_tars.json"
    if data.exists():
        return data
    root = folder / "tars"
    root.mkdir(parents=True, exist_ok=True)
    per_tar, size = -(-items // tars), 70_000
    padded = -(-size // 512) * 512
    keys = []
    for t in range(tars):
        first, last = t * per_tar, min(items, (t + 1) * per_tar)
        with open(root / f"{t:05d}.tar", "wb") as handle:
            offset = 0
            for n in range(first, last):
                info = tarfile.TarInfo(f"{n:09d}.jpg")
                info.size = size
                os.pwrite(handle.fileno(), info.tobuf(tarfile.GNU_FORMAT), offset)
                offset += 512 + padded
                keys.append(f"{n:09d}")
            handle.truncate(offset + 1024)  # the data and the two closing zero blocks: holes
    skus = [{"sku_id": f"sku{s:07d}", "name": f"Product {s}", "category": "snacks", "images": keys[s * 5 : s * 5 + 5]}
            for s in range(items // 5)]
    data.write_text(json.dumps(skus))
    return data


def make_video(folder: Path, items: int) -> Path:
    data = folder / f"pairs_{items}.json"
    if data.exists():
        return data
    clips, files = folder / "clips", sorted((REPO / "resources" / "demo" / "video" / "clips").glob("*.mp4"))
    pairs = []
    for n in range(items):
        rel = f"d{n % DIRS:04d}/clip{n:07d}.mp4"
        path = clips / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(files[n % len(files)])
        pairs.append({"clip": rel, "text": f"clip number {n}"})
    data.write_text(json.dumps(pairs))
    return data


def pipeline_config(pipeline: str, data: Path, shards: int) -> dict:
    if pipeline == "sku_index":
        return {"sku_index": {"sku_data": str(data), "images_dir": str(data.parent / "images"), "shards": shards},
                **only("sku_index")}
    if pipeline == "sku_index:tars":
        return {"sku_index": {"sku_data": str(data), "images_dir": str(data.parent / "tars"), "shards": shards,
                              "input_format": "webdataset"}, **only("sku_index")}
    return {**only("video_frames"),
            "video_frames": {"pairs": str(data), "clips_dir": str(data.parent / "clips"), "split_mode": "all_train",
                             "shards": {"train": shards}}}


# ---------------------------------------------------------------- faking a finished run (for the no-op)


def fake_outputs(work: Path, out: str) -> None:
    """Create every output the dry-run lists, so that --touch can record them as up to date."""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("output:"):
            for path in line.removeprefix("output:").split(","):
                path = work / path.strip()
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "done").touch()


def workflow_cmd(work: Path, *args: str) -> list[str]:
    return [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "config.json"), "--cores", "2", *args]


def measure_pipeline(pipeline: str, data: Path, items: int, shards: int, scratch: Path, check: bool) -> dict:
    work = scratch / f"{pipeline.replace(':', '_')}_{items}_{shards}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps(pipeline_config(pipeline, data, shards)))
    first, rss, out = measured(workflow_cmd(work, "-n"), work)
    again, rss2, _ = measured(workflow_cmd(work, "-n"), work)
    shard_rule = "sku_encode_shard" if pipeline.startswith("sku_index") else "video_extract_shard"
    jobs = out.count(f"rule {shard_rule}:")
    if check and jobs != shards:
        raise AssertionError(f"{pipeline}: the dry-run lists {jobs} shard jobs, expected {shards}")
    fake_outputs(work, out)
    run(workflow_cmd(work, "--touch", "--quiet"), work)
    noop, rss3, out3 = measured(workflow_cmd(work, "-n"), work)  # -n: never run a job, should one be out of date
    if "Nothing to be done" not in out3:
        raise AssertionError(f"{pipeline}: the rerun after --touch was not a no-op:\n{out3[-2000:]}")
    target = f"{shard_rule}:shard={ShardId(min(3, shards - 1), shards)}"
    if pipeline == "video_frames":
        target = target.replace("shard=", "split=train,shard=")
    startup, rss4, _ = measured(workflow_cmd(work, "--target-jobs", target, "--mode", "remote", "-n", "--quiet"),
                                work)
    return {"dry_run_s": first, "dry_run_again_s": again, "noop_s": noop, "job_startup_s": startup,
            "peak_rss_mib": max(rss, rss2, rss3), "job_rss_mib": rss4, "shard_jobs": jobs}


def measure_bare(shards: int, scratch: Path) -> dict:
    work = scratch / f"bare_{shards}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    (work / "Snakefile").write_text(BARE)
    for i in range(shards):
        (work / "in" / f"{i}.txt").write_text("x")
    cmd = [*SNAKEMAKE, "--snakefile", str(work / "Snakefile"), "--directory", str(work), "--cores", "2",
           "--config", f"count={shards}"]
    dry, rss, _ = measured([*cmd, "-n"], work)
    (work / "out").mkdir()
    for i in range(shards):
        (work / "out" / f"{i}.txt").write_text("x")
    (work / "merged.txt").write_text("x")
    run([*cmd, "--touch", "--quiet"], work)
    noop, _, out = measured([*cmd, "-n"], work)
    if "Nothing to be done" not in out:
        raise AssertionError(f"bare: the rerun after --touch was not a no-op:\n{out[-2000:]}")
    startup, _, _ = measured([*cmd, "--target-jobs", "shard:i=3", "--mode", "remote", "-n", "--quiet"], work)
    return {"dry_run_s": dry, "noop_s": noop, "job_startup_s": startup, "peak_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100000:1000", "1000000:10000"], help="items:shards")
    parser.add_argument("--pipelines", nargs="+", default=["sku_index", "sku_index:tars", "video_frames"],
                        help="sku_index:tars is sku_index with its images in webdataset tars")
    parser.add_argument("--items-per-tar", type=int, default=1000)
    parser.add_argument("--data", default="/tmp/mlprep-dag-scale", help="where the synthetic catalogs are kept")
    parser.add_argument("--check", action="store_true", help="assert the job counts (the CI test)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        seconds, rss, out = run(spec["cmd"], Path(spec["cwd"]))
        print(json.dumps({"seconds": seconds, "rss_mib": rss, "output": out}))
        return

    root = Path(args.data)
    rows = []
    for size in args.sizes:
        items, shards = (int(x) for x in size.split(":"))
        bare = measure_bare(shards, root / "work")
        for pipeline in args.pipelines:
            folder = root / pipeline.replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
            if pipeline == "sku_index:tars":
                data = make_sku_tars(folder, items, max(1, items // args.items_per_tar))
            else:
                data = make_sku(folder, items) if pipeline == "sku_index" else make_video(folder, items)
            ours = measure_pipeline(pipeline, data, items, shards, root / "work", args.check)
            rows.append({"pipeline": pipeline, "items": items, "shards": shards, "ours": ours, "bare": bare})

    print(f"DAG scale, {os.cpu_count()} cores; each figure one fresh Snakemake process; ratio = ours / bare DAG")
    print(f"{'pipeline':<15} {'items':>9} {'shards':>6} {'dry-run s':>10} {'(bare)':>7} {'ratio':>6} "
          f"{'again s':>8} {'ratio':>6} {'no-op s':>8} {'(bare)':>7} {'ratio':>6} {'job start s':>11} "
          f"{'(bare)':>7} {'RSS MiB':>8}")
    for r in rows:
        o, b = r["ours"], r["bare"]
        print(f"{r['pipeline']:<15} {r['items']:>9} {r['shards']:>6} {o['dry_run_s']:10.1f} {b['dry_run_s']:7.1f} "
              f"{o['dry_run_s'] / b['dry_run_s']:6.2f} {o['dry_run_again_s']:8.1f} "
              f"{o['dry_run_again_s'] / b['dry_run_s']:6.2f} {o['noop_s']:8.1f} {b['noop_s']:7.1f} "
              f"{o['noop_s'] / b['noop_s']:6.2f} {o['job_startup_s']:11.1f} {b['job_startup_s']:7.1f} "
              f"{o['peak_rss_mib']:8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
