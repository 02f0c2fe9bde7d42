"""The GPU device check's dry run: bench/device_check.sh --dry-run runs every step of the check on the CPU
(tiny sizes, device cpu), so the script is known to work before any device time is spent on it."""

from __future__ import annotations

import json
import os
import shutil
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
        ["sku", "profile", "probe", "speaker", "video", "nvcodec", "run_sku", "run_probe", "run_speech"], "ok")
    profile = result["profile"]["figures"]
    assert profile["views"] > 0 and profile["first_chunk_s"] > 0 and profile["top_cpu_ops"]
    sku = result["sku"]["figures"]
    assert sku["render_max_abs_diff"] == 0  # on a CPU the device's renderer is the CPU's
    assert sku["device_decode_mean_abs_diff"] < 0.5 and sku["min_cosine_to_cpu_fp32"] > 0.999
    rows = [(r["pipeline"], r["stage"]) for r in result["table_rows"]]
    for pipeline, stage in [("sku_index", "encoder only, batch 8"), ("sku_index", "shard job"),
                            ("sku_index", "readers only"), ("sku_index", "render only"),
                            ("sku_index", "GPU embeddings vs CPU fp32"), ("probe_qa", "zero-shot probe"),
                            ("speaker_embed", "resemblyzer shard job"), ("sku_index", "real gpu=1 run"),
                            *((p, "shard job start-up") for p in ("sku_index", "probe_qa", "speaker_embed"))]:
        assert any(p == pipeline and s.startswith(stage) for p, s in rows), (pipeline, stage, rows)
    assert any(r["pipeline"] == "video_frames" and "NVDEC" in r["stage"] for r in result["table_rows"])
    assert all("pyav+cuda 1 job, 1 lanes clips/s" in row for row in result["video"]["figures"].values())
    nvcodec = result["nvcodec"]["figures"]  # no GPU here: said, and the CPU side measured all the same
    assert nvcodec["nvcodec"].startswith("unavailable: ") and len(nvcodec["kinds"]) == 2
    assert all(row["pyav x2 clips/s"] > 0 for row in nvcodec["kinds"].values())
    assert any(p == "speaker_embed" and "steady state (first group at" in s for p, s in rows)  # start-up apart
    assert any(p == "sku_index" and "steady state (first batch at" in s for p, s in rows)
    run = result["run_images"]["sku_index"]
    assert run["shards"] == 2 and run["items"] == 64 and all(s is not None for s in run["startup_s"])
    # where the readers' CPU went, per photo (the shipped config: re-ranking features and shop-floor queries)
    assert set(run["reader_ms_per_item"]) == {"read", "views", "local_features", "shop_floor"}
    assert run["shop_floor_share"] == 1 and len(run["decode_workers"]) == 2
    assert any("readers' CPU a photo: " in s for p, s in rows if p == "sku_index")
    speech = result["run_speech"]["speaker_embed"]  # the demo corpus: one utterance in 20 is at 44.1 kHz
    assert {"read", "decode", "resample", "prepare"} == set(speech["reader_ms_per_item"])
    assert speech["resampled_utterances"] == 1
    assert any("readers' CPU an utterance: " in s for p, s in rows if p == "speaker_embed")
    assert "| sku_index | encoder only, batch 8 |" in (tmp_path / "gpu_table.md").read_text()


def test_each_part_runs_alone_and_reports_this_projects_commit_from_a_nested_copy(tmp_path):
    """Found on the GPU: run from a copy of the tree nested in another repository, the check reported that
    repository's commit. A copy's commit comes from the COMMIT file bench/device_wheels.sh writes."""
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
    assert set(sets) == {"images", "speech", "video", "nvcodec"}
    wheels = (REPO / "bench" / "device_wheels.sh").read_text()
    for name in sets:
        assert f".whl-{name}" in wheels


def test_the_gpu_decoders_resize_gives_the_extract_jobs_values():
    """bench/nvcodec_frames.py resizes a GPU decoder's frames on the device as two matrix products; on the sizes
    the pipeline meets they equal OpenCV's INTER_AREA, the extract job's resize, value for value (here on the CPU:
    the same torch operations)."""
    import cv2
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from nvcodec_frames import HEIGHT, WIDTH, area_weights, resized

    rng = np.random.default_rng(0)
    for height, width in [(180, 320), (360, 640), (720, 1280), (1080, 1920), (160, 256), (241, 333)]:
        noise = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        frames = np.stack([noise[0], cv2.GaussianBlur(noise[1], (0, 0), 3)])  # sharp and smooth
        got = resized(torch.from_numpy(frames)).numpy()
        want = np.stack([cv2.resize(f, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA) for f in frames])
        assert got.dtype == np.uint8 and np.array_equal(got, want), (height, width, (got != want).sum())
    assert torch.allclose(area_weights(640, 256).sum(dim=1), torch.ones(256))
    with pytest.raises(ValueError, match="downscale only"):
        area_weights(100, 160)


def _tiny_wheel(folder: Path) -> Path:
    """A real, minimal wheel (deflated, as pip downloads them): one module and its dist-info with RECORD's hashes."""
    import base64
    import hashlib
    import zipfile

    files = {"tinyset/__init__.py": b"VALUE = 42\n" + b"# padding that compresses\n" * 200,
             "tinyset-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinyset\nVersion: 1.0\n",
             "tinyset-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "tinyset-1.0.dist-info/RECORD,,\n"
    files["tinyset-1.0.dist-info/RECORD"] = record.encode()
    wheel = folder / "tinyset-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def test_a_wheel_set_travels_as_one_xz_tar_and_installs_through_the_device_checks_own_script(tmp_path):
    """The wheel sets with the tree were over what a call may carry: bench/device_wheels.sh packs each set as one
    xz tar of stored wheels (bench/wheelset.py) and device_check.sh unpacks it before pip installs the wheels."""
    import zipfile

    copy = tmp_path / "tree"
    (copy / "bench").mkdir(parents=True)
    for name in ("device_check.sh", "wheelset.py"):
        shutil.copy(REPO / "bench" / name, copy / "bench" / name)
    folder = copy / ".whl-tiny"
    folder.mkdir()
    wheel = _tiny_wheel(folder)
    members = {i.filename: zipfile.ZipFile(wheel).read(i) for i in zipfile.ZipFile(wheel).infolist()}
    packed = subprocess.run([sys.executable, "bench/wheelset.py", "pack", str(folder)], cwd=copy, capture_output=True,
                            text=True)
    assert packed.returncode == 0, packed.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["wheels.tar.xz"]  # the loose wheel gone
    unpacked = tmp_path / "unpacked"
    subprocess.run([sys.executable, "bench/wheelset.py", "unpack", str(folder), str(unpacked)], cwd=copy, check=True)
    with zipfile.ZipFile(unpacked / wheel.name) as z:  # the same files, stored
        assert {i.filename: z.read(i) for i in z.infolist()} == members
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    # the check's own install step: a part it does not know stops it after the install, before anything runs
    site = tmp_path / "site"
    env = {**os.environ, "SITE": str(site), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "bench/device_check.sh", "tiny"], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "unknown part tiny" in done.stderr, done.stderr
    got = subprocess.run([sys.executable, "-c", "import tinyset; print(tinyset.VALUE)"], env={**env, "PYTHONPATH":
                         str(site)}, capture_output=True, text=True)
    assert got.stdout.strip() == "42", got.stderr
    # a damaged archive is named, not a traceback
    (folder / "wheels.tar.xz").write_bytes(b"not an archive")
    bad = subprocess.run(["bash", "bench/device_check.sh", "tiny"], cwd=copy, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "wheels.tar.xz: cannot be read" in bad.stderr, bad.stderr


def test_a_part_leaves_three_files_for_the_device_call_to_bring_back(tmp_path):
    """A device call brings back 8 files at most: a part's steps work elsewhere, and its figures, table and one
    archive of every step's figures and log go to $OUT. Run here with a budget too small for any step."""
    import tarfile

    copy = tmp_path / "tree"  # a copy with no wheel sets beside it: the check uses what is installed
    shutil.copytree(REPO / "bench", copy / "bench")
    shutil.copytree(REPO / "mlprep", copy / "mlprep")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    done = subprocess.run(["bash", "bench/device_check.sh", "video", "--budget", "5"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "video-device_check.json", "video-gpu_table.md", "video.tgz"]
    result = json.loads((tmp_path / "out" / "video-device_check.json").read_text())
    assert result["steps"]["video"]["status"] == "skipped: no time left"  # said, not dropped
    with tarfile.open(tmp_path / "out" / "video.tgz") as tar:
        assert {"./device_check.json", "./gpu_table.md"} <= set(tar.getnames())


def _session_members(session: int) -> list[int]:
    """Live processes (zombies aside) whose session is `session`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(stat.parent.name))
    return members


def test_a_step_past_its_limit_ends_with_every_process_it_started(tmp_path):
    """A step that outlives its limit is ended whole: the processes it started (snakemake's jobs, a benchmark's
    readers) do not run on into the next step's figures. The figures so far are saved after every step."""
    import time

    sys.path.insert(0, str(REPO / "bench"))
    import device_check

    saved = []
    steps = device_check.Steps(tmp_path, time.time() + 60, shortest=1,
                               after_each=lambda: saved.append({k: v["status"] for k, v in steps.results.items()}))
    quick = [sys.executable, "-c", "import json, sys; open(sys.argv[-1], 'w').write(json.dumps({'rate': 1.5}))"]
    assert steps.run("quick", quick, limit=30) == {"rate": 1.5}
    hang = [sys.executable, "-c", "import os, subprocess, sys, time; child = subprocess.Popen(['sleep', '300']); "
                                  f"open({str(tmp_path / 'child')!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); "
                                  "time.sleep(300)"]
    started = time.time()
    assert steps.run("hang", hang, limit=3) is None
    assert time.time() - started < 30
    assert steps.results["hang"]["status"] == "timed out after 3 s"
    step_pid, child_pid = map(int, (tmp_path / "child").read_text().split())
    assert _session_members(step_pid) == []  # the grandchild too, not only the process the step started
    try:  # gone, or a zombie left unreaped
        assert Path(f"/proc/{child_pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        pass
    steps.deadline = time.time()
    assert steps.run("late", quick, limit=30) is None
    assert saved == [{"quick": "ok"}, {"quick": "ok", "hang": "timed out after 3 s"},
                     {"quick": "ok", "hang": "timed out after 3 s", "late": "skipped: no time left"}]


def test_a_check_stopped_midway_keeps_the_figures_of_the_steps_it_finished(tmp_path):
    """A device call cut short at its time limit brings back what is in $OUT: the check writes its figures there
    after every step, and, stopped, ends the step it was running with every process of it."""
    import re
    import signal
    import time

    partial = tmp_path / "out" / "nvcodec-device_check.json"
    with open(tmp_path / "log", "w") as log:
        check = subprocess.Popen([sys.executable, "bench/device_check.py", "--dry-run", "--parts", "nvcodec", "video",
                                  "--out", str(tmp_path / "work"), "--partial", str(partial)], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            give_up = time.time() + 240
            while "=== video" not in (tmp_path / "log").read_text() or "session" not in (tmp_path / "log").read_text():
                assert check.poll() is None and time.time() < give_up, (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2)  # the video step's processes under way
            check.send_signal(signal.SIGTERM)
            assert check.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            check.kill()
    text = (tmp_path / "log").read_text()
    session = int(re.search(r"=== video: .*\n    session (\d+)", text).group(1))
    assert _session_members(session) == [], text[-2000:]
    result = json.loads(partial.read_text())
    assert result["finished"] is False and result["steps_so_far"]["nvcodec"]["status"] == "ok"
    assert result["nvcodec"]["figures"]["kinds"], result
    assert "video" not in result["steps_so_far"]
