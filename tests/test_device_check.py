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
        ["sku", "profile", "probe", "speaker", "video", "run_sku", "run_probe", "run_speech"], "ok")
    profile = result["profile"]["figures"]
    assert profile["views"] > 0 and profile["first_chunk_s"] > 0 and profile["top_cpu_ops"]
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
    assert any(p == "speaker_embed" and "steady state (first group at" in s for p, s in rows)  # start-up apart
    run = result["run_images"]["sku_index"]
    assert run["shards"] == 2 and run["items"] == 64 and all(s is not None for s in run["startup_s"])
    assert "| sku_index | encoder only, batch 8 |" in (tmp_path / "gpu_table.md").read_text()


def test_each_part_runs_alone_and_reports_this_projects_commit_from_a_nested_copy(tmp_path):
    """Found on the GPU: run from a copy of the tree nested in another repository, the check reported that
    repository's commit. A copy's commit comes from the COMMIT file bench/device_wheels.sh writes."""
    import shutil

    outer = tmp_path / "outer"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "another repository"], check=True)
    copy = outer / "copy"
    shutil.copytree(REPO / "bench", copy / "bench")
    shutil.copytree(REPO / "mlprep", copy / "mlprep")
    probe = [sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); import device_check; "
                                   "print(device_check.project_commit())"]
    assert subprocess.run(probe, cwd=copy, capture_output=True, text=True).stdout.strip() == "unknown"
    (copy / ".whl-images").mkdir()
    (copy / ".whl-images" / "COMMIT").write_text("abc1234+changes\n")
    got = subprocess.run(probe, cwd=copy, capture_output=True, text=True).stdout.strip()
    assert got == "abc1234+changes (from bench/device_wheels.sh)"
    own = subprocess.run(probe, cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert own.startswith(head.stdout.strip())
    # every part the shell script names is one the check knows, and each set's parts need only that set
    script = (REPO / "bench" / "device_check.sh").read_text()
    import re

    sets = dict(re.findall(r"^  (\w+)\) parts=\(([^)]*)\)", script, re.M))
    assert set(sets) == {"images", "speech", "video"}
    wheels = (REPO / "bench" / "device_wheels.sh").read_text()
    for name in sets:
        assert f".whl-{name}" in wheels
