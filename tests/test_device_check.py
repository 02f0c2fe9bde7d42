"""The GPU device check's dry run: bench/device_check.sh --dry-run runs every step of the check on the CPU
(tiny sizes, device cpu), so the script is known to work before any device time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_check_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert result["dry_run"] and result["machine"]["device"] == "cpu"
    assert {k: v["status"] for k, v in result["steps"].items()} == dict.fromkeys(
        ["sku", "probe", "speaker", "video", "run_sku", "run_demo"], "ok")
    sku = result["sku"]["figures"]
    assert sku["render_max_abs_diff"] == 0  # on a CPU the device's renderer is the CPU's
    assert sku["device_decode_mean_abs_diff"] < 0.5 and sku["min_cosine_to_cpu_fp32"] > 0.999
    rows = [(r["pipeline"], r["stage"]) for r in result["table_rows"]]
    for pipeline, stage in [("sku_index", "encoder only, batch 8"), ("sku_index", "shard job"),
                            ("sku_index", "GPU embeddings vs CPU fp32"), ("probe_qa", "zero-shot probe"),
                            ("speaker_embed", "resemblyzer shard job"), ("sku_index", "real gpu=1 run"),
                            *((p, "shard job start-up") for p in ("sku_index", "probe_qa", "speaker_embed"))]:
        assert any(p == pipeline and s.startswith(stage) for p, s in rows), (pipeline, stage, rows)
    assert any(r["pipeline"] == "video_frames" and "NVDEC" in r["stage"] for r in result["table_rows"])
    run = result["run"]["sku_index"]
    assert run["shards"] == 2 and run["items"] == 64 and all(s is not None for s in run["startup_s"])
    assert "| sku_index | encoder only, batch 8 |" in (tmp_path / "gpu_table.md").read_text()
