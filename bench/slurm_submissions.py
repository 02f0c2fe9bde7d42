"""sbatch calls and wall time for many tiny shards: job arrays (the profile's way), one job per shard, job groups.

Needs root and SLURM installed (`make slurm-packages`); starts its own single-node cluster with
tests/cluster/slurm_cluster.sh and stops it at the end. Runs video_frames on the demo clips with
`--shards` train shards through profiles/slurm, once per mode, each in a fresh folder, and counts
the distinct SLURM job ids each run created (an array submission is one id with many tasks) and
checks that every shard's output was written by a task of its own.
Tiny shards need little memory: every mode runs them with 1,500 MB (the profile's 6,000 MB would fit
only 3 at a time on the test node), so 8 run at once on its 8 declared CPUs.
Run: .venv/bin/python bench/slurm_submissions.py [--shards 1000] [--other-shards 200] [--modes ...]
  --other-shards: the shard count for the modes other than arrays (each of their shards costs a
  submission, so at 1,000 they only take longer); the table gives seconds per shard to compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mlprep.config import only

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SCRIPT = REPO / "tests" / "cluster" / "slurm_cluster.sh"
TINY = ["--set-resources", "video_extract_shard:mem_mb=1500"]
MODES = {
    "job arrays (profile)": TINY,
    "one job per shard": [*TINY, "--slurm-array-jobs", ""],
    # A group asks SLURM for the sum of its members' resources at once: 50 shards of 1 CPU and 6 GB would
    # need 50 CPUs and 300 GB. Groups of 8 tiny shards fit this 8-CPU, 23 GB node (one group at a time).
    "job groups of 8": [*TINY, "--slurm-array-jobs", "", "--groups", "video_extract_shard=vx",
                        "--group-components", "vx=8"],
}


def sacct_jobs() -> list[tuple[str, str]]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,Comment"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return [tuple(line.split("|", 1)) for line in out.splitlines() if line.strip()]


def run_mode(workdir: Path, shards: int, extra: list[str]) -> tuple[float, int, int]:
    demo = REPO / "resources" / "demo" / "video"
    config = {
        **only("video_frames"),
        "video_frames": {"pairs": str(demo / "train_pairs.json"), "clips_dir": str(demo / "clips"),
                         "split_mode": "all_train", "shards": {"train": shards}},
    }
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    before = {job_id for job_id, _ in sacct_jobs()}
    started = time.perf_counter()
    subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
                    "--configfile", str(workdir / "config.yaml"), "--profile", str(REPO / "profiles" / "slurm"),
                    "--slurm-init-seconds-before-status-checks", "5", *extra],
                   check=True, capture_output=True, timeout=7200)
    seconds = time.perf_counter() - started
    new = [job_id for job_id, _ in sacct_jobs() if job_id not in before]
    from mlprep.io import read_parquet_metadata

    written = {read_parquet_metadata(p)["stats"]["shard"] for p in (workdir / "results" / "video_frames" / "train")
               .glob("*.index.parquet")}
    if len(written) != shards:
        raise RuntimeError(f"only {len(written)} of {shards} shards were written by their own job")
    return seconds, len({job_id.split("_")[0] for job_id in new}), len(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--other-shards", type=int, default=None, help="shards for the non-array modes")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="which of: " + ", ".join(MODES))
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mlprep-slurm-bench-"))
    env = {**os.environ, "SLURM_BASE": str(base)}
    rows = {}
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=300, capture_output=True)
        for name in args.modes:
            shards = args.shards if name.startswith("job arrays") else (args.other_shards or args.shards)
            rows[name] = (shards, *run_mode(base / "runs" / name.replace(" ", "-"), shards, MODES[name]))
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=180, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    print(f"video_frames through profiles/slurm (single-node cluster: 8 declared CPUs on {os.cpu_count()} cores)")
    print(f"{'mode':<22} {'shards':>6} {'sbatch calls':>12} {'jobs/tasks':>10} {'wall s':>8} {'s/shard':>8}")
    for name, (shards, seconds, submissions, tasks) in rows.items():
        print(f"{name:<22} {shards:>6} {submissions:>12} {tasks:>10} {seconds:8.1f} {seconds / shards:8.2f}")


if __name__ == "__main__":
    main()
