"""Local GPU slot assignment, with fake devices: concurrent jobs never share a device index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_snakemake, workflow_config

HOLDER = """
import os, sys, time
from mlprep.gpuslots import claim_gpu
try:
    print(claim_gpu(wait_s=float(sys.argv[1])), flush=True)
except Exception as err:
    print(type(err).__name__, err, flush=True)
    sys.exit(3)
time.sleep(float(sys.argv[2]))
"""


def _holder(env, wait_s, hold_s):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(wait_s), str(hold_s)], env=env,
                            stdout=subprocess.PIPE, text=True)


@pytest.fixture()
def fake_gpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(MLPREP_GPU_COUNT="2", MLPREP_GPU_LOCK_DIR=str(tmp_path / "locks"))
    return env


def test_concurrent_jobs_get_distinct_devices_and_a_third_waits(fake_gpus):
    a = _holder(fake_gpus, 0, 4)
    b = _holder(fake_gpus, 0, 4)
    first = {a.stdout.readline().strip(), b.stdout.readline().strip()}
    assert first == {"0", "1"}
    c = _holder(fake_gpus, 0.5, 0)  # both taken: fails with a message naming the fix
    out, _ = c.communicate(timeout=30)
    assert c.returncode == 3 and "NoFreeGpuError" in out and "--resources gpu=2" in out
    d = _holder(fake_gpus, 30, 0)  # waits until a or b exits, then gets its device
    started = time.monotonic()
    got = d.stdout.readline().strip()
    assert got in {"0", "1"} and time.monotonic() - started > 1
    for p in (a, b, d):
        p.wait(timeout=30)


def test_a_killed_job_frees_its_slot(fake_gpus):
    a = _holder(fake_gpus, 0, 60)
    assert a.stdout.readline().strip() == "0"
    a.kill()
    a.wait()
    b = _holder(fake_gpus, 0, 0)
    assert b.stdout.readline().strip() == "0"
    b.wait(timeout=30)


def test_scheduler_assignment_is_respected(fake_gpus):
    b = _holder({**fake_gpus, "CUDA_VISIBLE_DEVICES": "1"}, 0, 0)
    assert b.stdout.readline().strip() == "1"
    b.wait(timeout=30)
    none = _holder({**fake_gpus, "MLPREP_GPU_COUNT": "0"}, 0, 0)
    assert none.stdout.readline().strip() == "None"
    none.wait(timeout=30)


@pytest.mark.slow
def test_workflow_gpu_jobs_claim_slots(sku_workdir, tiny_clip, fake_gpus, monkeypatch):
    for key in ("MLPREP_GPU_COUNT", "MLPREP_GPU_LOCK_DIR"):
        monkeypatch.setenv(key, fake_gpus[key])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = workflow_config(sku_workdir, tiny_clip)
    config["device"] = "auto"
    run_snakemake(sku_workdir, config, "--resources", "gpu=2", "--set-threads", "sku_encode_shard=1")
    shards = sorted((sku_workdir / "results" / "sku_index" / "shards").glob("*/stats.json"))
    seen = [json.loads(p.read_text())["cuda_visible_devices"] for p in shards]
    assert len(seen) == 2 and set(seen) <= {"0", "1"}
