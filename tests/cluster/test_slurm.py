"""The whole default workflow through `--profile profiles/slurm` on a real single-node SLURM cluster.

The cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd, two fake GPUs as GRES) is started by
tests/cluster/slurm_cluster.sh and stopped by PID at the end, also on failure. The run's results
must equal a local run's, every non-local job must show up in sacct, and GPU rules must have got
a GPU from SLURM.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mlprep.config import only

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.slow


def _demo_config(workdir: Path) -> Path:
    demo = REPO / "resources" / "demo"
    config = {
        "sku_index": {"sku_data": str(demo / "sku" / "sku_data.json"), "images_dir": str(demo / "sku" / "images")},
        "video_frames": {"pairs": str(demo / "video" / "train_pairs.json"), "clips_dir": str(demo / "video" / "clips")},
        **only("sku_index", "video_frames"),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake(workdir: Path, *args: str, timeout: int = 1200) -> float:
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(_demo_config(workdir)), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(p.read_text()[-2000:] for p in workdir.glob(".snakemake/slurm_logs/**/*.log"))
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n{logs}")
    return time.perf_counter() - started


def _sacct() -> list[dict]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,JobName,AllocTRES,State,Comment"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    keys = ["job_id", "name", "tres", "state", "comment"]
    return [dict(zip(keys, line.split("|", 4))) for line in out.splitlines() if line.strip()]


def _index(workdir: Path):
    import faiss

    folder = workdir / "results" / "sku_index"
    index = faiss.read_index(str(folder / "index.faiss"))
    return index.reconstruct_n(0, index.ntotal), pd.read_parquet(folder / "metadata.parquet")


def _frames(workdir: Path) -> dict:
    records = {}
    for path in sorted((workdir / "results" / "video_frames").glob("*/*.pkl")):
        with open(path, "rb") as handle:
            records.update({r["id"]: r for r in pickle.load(handle)})
    return records


PROFILE = REPO / "profiles" / "slurm"


def _profile_run(workdir: Path, *args: str) -> float:
    """The workflow through profiles/slurm exactly as a user runs it (only the first status check sooner)."""
    return _snakemake(workdir, "--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", "5", *args)


def test_default_workflow_on_slurm_equals_local_run(slurm_cluster, tmp_path):
    before = {j["job_id"] for j in _sacct()}  # the cluster serves the whole session: other tests' jobs are there
    local_s = _snakemake(tmp_path / "local", "--cores", "2")
    slurm_s = _profile_run(tmp_path / "slurm")
    print(f"\nwall time: local {local_s:.1f} s, SLURM {slurm_s:.1f} s")

    jobs = [j for j in _sacct() if j["job_id"].split("_")[0] not in {b.split("_")[0] for b in before}]
    print("\n".join(f"{j['job_id']} {j['state']} {j['tres']} {j['comment']}" for j in jobs))
    rules = sorted(j["comment"].split("_wildcards")[0].removeprefix("rule_") for j in jobs)
    video_shards = len(list((tmp_path / "local" / "results" / "video_frames").glob("*/*.pkl")))
    assert video_shards >= 2
    assert rules == sorted(["sku_encode_shard"] * 2 + ["sku_build_index", "sku_evaluate"]
                           + ["video_extract_shard"] * video_shards), jobs
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    gpu_jobs = [j for j in jobs if "sku_encode_shard" in j["comment"]]
    assert all("gres/gpu=1" in j["tres"] for j in gpu_jobs), gpu_jobs
    assert not any("gres/gpu" in j["tres"] for j in jobs if j not in gpu_jobs), jobs
    submissions = {j["job_id"].split("_")[0] for j in jobs}
    assert len(submissions) < len(jobs)  # the shard rules went as job arrays
    for stats_path in (tmp_path / "slurm" / "results" / "sku_index" / "shards").glob("*/stats.json"):
        stats = json.loads(stats_path.read_text())
        assert stats["slurm_job_id"] and stats["cuda_visible_devices"] in {"0", "1"}, stats
        # the profile's set-threads (4), not the rule's 2; a job uses at most the node's cores (2 here)
        assert stats["threads"] == min(4, os.cpu_count()), stats
    # the profile's per-rule resources reached SLURM: no command-line override replaced them
    tres = {j["comment"].split("_wildcards")[0].removeprefix("rule_"): dict(kv.split("=") for kv in j["tres"].split(","))
            for j in jobs}
    mem_mb = {rule: int(t["mem"].removesuffix("M")) for rule, t in tres.items()}
    assert 16000 <= mem_mb["sku_encode_shard"] <= 16010 and tres["sku_encode_shard"]["cpu"] == "4", tres
    assert 6000 <= mem_mb["video_extract_shard"] <= 6010, tres

    local_vectors, local_meta = _index(tmp_path / "local")
    slurm_vectors, slurm_meta = _index(tmp_path / "slurm")
    np.testing.assert_array_equal(slurm_vectors, local_vectors)
    pd.testing.assert_frame_equal(slurm_meta, local_meta)
    local_eval = json.loads((tmp_path / "local" / "results" / "sku_index" / "eval.json").read_text())
    assert json.loads((tmp_path / "slurm" / "results" / "sku_index" / "eval.json").read_text()) == local_eval
    local_frames, slurm_frames = _frames(tmp_path / "local"), _frames(tmp_path / "slurm")
    assert sorted(local_frames) == sorted(slurm_frames) and len(local_frames) == 8
    for clip_id, record in local_frames.items():
        np.testing.assert_array_equal(slurm_frames[clip_id]["frames"], record["frames"])


def _array_limit() -> int:
    return int(yaml.safe_load(PROFILE.joinpath("config.yaml").read_text())["slurm-array-limit"])


def test_an_array_of_the_profiles_largest_size_runs_every_shard_in_its_own_task(slurm_cluster, tmp_path):
    """One video_frames array of exactly slurm-array-limit tasks: every task must have run its own shard."""
    from mlprep.io import read_parquet_metadata

    tasks = _array_limit()
    demo = REPO / "resources" / "demo" / "video"
    work = tmp_path / "array"
    work.mkdir()
    config = {**only("video_frames"),
              "video_frames": {"pairs": str(demo / "train_pairs.json"), "clips_dir": str(demo / "clips"),
                               "split_mode": "all_train", "shards": {"train": tasks}}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    before = {j["job_id"] for j in _sacct()}
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
           str(work / "config.yaml"), "--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    new = [j for j in _sacct() if j["job_id"] not in before]
    arrays = {j["job_id"].split("_")[0] for j in new}
    assert len(new) == tasks and len(arrays) == 1, new  # one sbatch call, one task per shard
    assert all(j["state"] == "COMPLETED" for j in new), new
    seen = {}
    for index in sorted((work / "results" / "video_frames" / "train").glob("*.index.parquet")):
        stats = read_parquet_metadata(index)["stats"]
        assert stats["shard"] == f"train/{index.name.removesuffix('.index.parquet')}"
        seen[stats["shard"]] = (stats["slurm_array_job_id"], stats["slurm_array_task_id"])
    assert len(seen) == tasks
    assert {job for job, _ in seen.values()} == arrays
    assert sorted(int(task) for _, task in seen.values()) == list(range(1, tasks + 1))
    summary = json.loads((work / "results" / "video_frames" / "summary.json").read_text())
    assert summary["clips_ok"] == 8  # every demo clip extracted, by whichever task its shard got
