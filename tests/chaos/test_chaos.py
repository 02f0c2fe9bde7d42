"""The chaos suite: the whole default workflow (all five pipelines on the bundled demo data) killed at seeded random
times and rerun, fed corrupted and hostile inputs of every kind, and given broken configs; and its report opened
in a real browser. Each run is a real Snakemake process tree; nothing is mocked."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, SNAKEMAKE, run_snakemake

pytestmark = pytest.mark.slow

# Not final artefacts: logs, resource benchmarks, the report (timings), the catalog caches, the LLM answer cache.
SKIPPED_PARTS = {"logs", "benchmarks", "report", "report.html", "lists", "llm_cache"}
VOLATILE = re.compile(r"(^|_)(s|seconds|per_s)$|^startup|^slurm_|^cuda_visible_devices$|^created$")


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def demo_workdir(path: Path, copy: bool = False) -> Path:
    """A folder to run the default config in: the repository's demo data linked (or copied) at resources/."""
    path.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(REPO / "resources", path / "resources", symlinks=False)
    else:
        (path / "resources").symlink_to(REPO / "resources")
    return path


def _without_volatile(value):
    if isinstance(value, dict):
        out = {k: _without_volatile(v) for k, v in value.items() if not VOLATILE.search(str(k))}
        if {"sent", "cache_hits"} <= out.keys():  # LLM counters: a resumed run answers from its cache what it had
            out["requests"] = out.pop("sent") + out.pop("cache_hits")  # sent before the kill; their sum is the same
        return out
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _same(a, b, where: str) -> None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{k}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def artefacts(results: Path) -> list[Path]:
    return sorted(p.relative_to(results) for p in results.rglob("*")
                  if p.is_file() and not SKIPPED_PARTS & set(p.relative_to(results).parts))


def assert_same_artefacts(expected: Path, actual: Path) -> int:
    """Every final artefact equal: bytes where the format allows, arrays, tables and records otherwise (JSON
    without its timings). Returns how many files were compared."""
    names = artefacts(expected)
    assert names == artefacts(actual)
    for name in names:
        a, b = expected / name, actual / name
        if name.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(b), pd.read_parquet(a), obj=str(name))
        elif name.suffix == ".npy":
            np.testing.assert_array_equal(np.load(b), np.load(a), err_msg=str(name))
        elif name.suffix == ".json":
            _same(_without_volatile(json.loads(a.read_text())), _without_volatile(json.loads(b.read_text())), str(name))
        elif name.suffix == ".pkl":  # this workflow's own outputs, not user input
            with open(a, "rb") as fa, open(b, "rb") as fb:
                _same(pickle.load(fa), pickle.load(fb), str(name))
        else:
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"
    return len(names)


def leftovers(results: Path) -> list[Path]:
    """Hidden temporary files or folders (what an interrupted writer leaves) anywhere under results/."""
    return [p for p in results.rglob("*") if (p.name.startswith(".") or ".tmp" in p.name)
            and p.name != ".snakemake_timestamp"]  # Snakemake's own mark in a directory output


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The default workflow, uninterrupted, and its report."""
    work = demo_workdir(tmp_path_factory.mktemp("clean"))
    run_snakemake(work, default_config())
    run_snakemake(work, default_config(), "--report", "results/report.html")
    return work


def _start(work: Path, config: dict) -> subprocess.Popen:
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
           str(work / "config.yaml"), "--cores", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_killed_at_random_times_the_rerun_equals_an_uninterrupted_run(clean_run, tmp_path):
    seed = int(os.environ.get("MLPREP_CHAOS_SEED", "2026"))
    rng = random.Random(seed)
    delays = [round(rng.uniform(6, 30), 1) for _ in range(3)]
    work = demo_workdir(tmp_path / "killed")
    config = default_config()
    killed = []
    for delay in delays:
        proc = _start(work, config)
        deadline = time.time() + delay
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if proc.poll() is not None:  # the run finished first: nothing left to interrupt
            break
        os.killpg(proc.pid, signal.SIGKILL)  # the whole tree, no cleanup: as a node failure or OOM kill
        proc.wait(timeout=60)
        killed.append(delay)
        run_snakemake(work, config, "--unlock")
    print(f"\nseed {seed}: killed after {killed} s")
    assert killed, "the first run finished before it could be killed"
    run_snakemake(work, config)
    assert leftovers(work / "results") == []
    compared = assert_same_artefacts(clean_run / "results", work / "results")
    assert compared > 60


def test_the_report_renders_every_pipeline_in_a_browser(clean_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("MLPREP_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (make test installs it as root)")
        pytest.skip("chromium is not installed")
    pipelines = ["sku_index", "video_frames", "speaker_embed", "kline_factor", "probe_qa"]
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
    for page, size in [(clean_run / "results" / "report.html", "1280,900"),
                       (clean_run / "results" / "report" / "overview.html", "1280,4000")]:
        dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / f"{page.stem}.png"
        subprocess.run([*base, f"--window-size={size}", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                       timeout=120, cwd=tmp_path)
        from PIL import Image

        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{page.name}: the screenshot is blank"
        if page.name == "report.html":  # Snakemake's report, rendered by its script: a category per pipeline
            assert all(name in dom for name in [*pipelines, "overview"]), dom[-2000:]
        else:
            for name in pipelines:
                assert re.search(rf"<h2>{name}</h2>", dom), name
            assert dom.count("<img") >= len(pipelines) + 1 and "throughput per rule" in dom
            # each pipeline leads with its headline figures in words, the full metrics folded away
            for phrase in ["held-out augmented views of 16 SKUs", "tf_efficientnet_lite0, weights packaged:",
                           "EER", "against", "for as many random matches", "probe accuracy", "clips made into"]:
                assert phrase in dom, phrase
            assert dom.count("<details>") == len(pipelines)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # the first pipeline's headline is on screen without scrolling
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((clean_run / "results" / "report" / "overview.html").as_uri())
        box = page.locator(".headline").first.bounding_box()
        assert box is not None and box["y"] + box["height"] < 900, box
        assert "top-1" in page.locator(".headline").first.inner_text()
        page.screenshot(path=str(tmp_path / "overview-above-the-fold.png"))
        browser.close()


# ---------------------------------------------------------------- bad input of every kind


def _corrupt_inputs(root: Path, rng: random.Random) -> dict[str, set[str]]:
    """About 10% of the items of each input kind broken in a kind-specific way; returns the broken item ids."""
    demo = root / "resources" / "demo"
    broken: dict[str, set[str]] = {}
    images = sorted((demo / "sku" / "images").glob("*.jpg"))
    picked = rng.sample(images, 3)
    picked[0].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    picked[1].write_bytes(picked[1].read_bytes()[:300])  # truncated
    picked[2].write_bytes(b"")
    broken["sku_index"] = {f"{p.stem.rsplit('_', 1)[0]}/{p.name}" for p in picked}
    clips = sorted((demo / "video" / "clips").glob("*.mp4"))
    clip = rng.choice(clips)
    clip.write_bytes(clip.read_bytes()[:2000])
    broken["video_frames"] = {clip.stem}
    speakers = sorted(p for p in (demo / "speech").glob("*/*") if p.is_dir())
    utterances = [sorted(s.iterdir())[0] for s in rng.sample(speakers, 2)]  # two speakers, one utterance each
    utterances[0].write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    utterances[1].write_bytes(os.urandom(4000))
    broken["speaker_embed"] = {str(u.relative_to(demo / "speech").with_suffix("")) for u in utterances}
    prices = rng.sample(sorted((demo / "prices").glob("*.csv")), 3)
    prices[0].write_bytes(os.urandom(3000))
    prices[1].write_text("date,open,high,low\n2020-01-02,1,2,0.5\n")
    prices[2].write_text("")
    broken["kline_factor"] = {p.stem for p in prices}
    table = pq.read_table(demo / "probe" / "a.parquet")
    rows = rng.sample(range(table.num_rows), 3)
    cells = table.column("image").to_pylist()
    for row in rows:
        cells[row] = b"\x89PNG\r\n\x1a\n broken"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(cells, pa.binary()))
    pq.write_table(table, demo / "probe" / "a.parquet", row_group_size=16)
    broken["probe_qa"] = {f"a.parquet:{r}" for r in rows} | {"c.parquet:5"}  # c.parquet:5 comes broken in the demo
    return broken


def _outputs(results: Path) -> dict[str, set[str]]:
    """The ids of the items each pipeline's outputs hold."""
    return {
        "sku_index": set(pd.read_parquet(results / "sku_index" / "metadata.parquet")["item_id"]),
        "video_frames": set(pd.read_parquet(results / "video_frames" / "index.parquet").query("status == 'ok'")[
            "clip_id"]),
        "speaker_embed": set(pd.read_parquet(results / "speaker_embed" / "utterances.parquet")["item_id"]),
        "kline_factor": set(pd.read_parquet(results / "kline_factor" / "library.parquet")["symbol"]),
        "probe_qa": set(pd.read_parquet(results / "probe_qa" / "probe.parquet")["item_id"]),
    }


def test_corrupted_inputs_of_every_kind_are_each_one_failure_and_the_rest_is_kept(clean_run, tmp_path):
    work = demo_workdir(tmp_path / "corrupt", copy=True)
    broken = _corrupt_inputs(work, random.Random(5))
    config = default_config()
    run_snakemake(work, config)
    results = work / "results"
    kept, expected = _outputs(results), _outputs(clean_run / "results")
    for pipeline, ids in broken.items():
        failures = pd.read_parquet(results / pipeline / "failures.parquet")
        counts = failures["item_id"].value_counts()
        assert {i: int(counts.get(i, 0)) for i in ids} == dict.fromkeys(ids, 1), (pipeline, failures)
        assert failures.loc[failures["item_id"].isin(ids), "reason"].str.len().gt(0).all()
        assert kept[pipeline] == expected[pipeline] - ids, pipeline  # every good item is in the outputs
    assert leftovers(results) == []

    strict = demo_workdir(tmp_path / "strict")
    (strict / "resources").unlink()
    (strict / "resources").symlink_to(work / "resources")
    proc = run_snakemake(strict, {**config, "continue_on_error": False}, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    corrupted_files = {"sku": [f"images/{i.split('/')[1]}" for i in broken["sku_index"]],
                       "video": [f"{c}.mp4" for c in broken["video_frames"]],
                       "speech": [f"{u}." for u in broken["speaker_embed"]],
                       "prices": [f"prices/{s}.csv" for s in broken["kline_factor"]],
                       "probe": ["probe/a.parquet", "probe/c.parquet"]}
    assert any(f in output for files in corrupted_files.values() for f in files), output[-3000:]


HOSTILE_IDS = ["../../escape", "/etc/cron.d/x", "nul\x00id", "ünïcødé-日本語", "x" * 300, "C:\\tmp\\y", ".."]


def _hostile_inputs(root: Path) -> None:
    """Every manifest of the demo with ids and paths that try to leave the folders (or the file system)."""
    demo = root / "resources" / "demo"
    skus = json.loads((demo / "sku" / "sku_data.json").read_text())
    first = skus[0]["images"][0]
    skus += [{"sku_id": sid, "name": "hostile", "category": "snacks", "images": [first]} for sid in HOSTILE_IDS]
    skus.append({"sku_id": "paths", "images": ["../../../etc/passwd", "/etc/passwd", first]})
    (demo / "sku" / "sku_data.json").write_text(json.dumps(skus))
    pairs = json.loads((demo / "video" / "train_pairs.json").read_text())
    pairs += [{"clip": c, "text": "hostile"} for c in ["../../escape.mp4", "/etc/passwd", "nul\x00.mp4", "y" * 300]]
    (demo / "video" / "train_pairs.json").write_text(json.dumps(pairs))
    for name in ["ünï..cødé", "z" * 200]:
        shutil.copy(demo / "prices" / "S000.csv", demo / "prices" / f"{name}.csv")
    wavs = sorted((demo / "speech").rglob("*.wav"))
    ids = [(HOSTILE_IDS[0], HOSTILE_IDS[1], HOSTILE_IDS[6]), (HOSTILE_IDS[0], HOSTILE_IDS[1], HOSTILE_IDS[4]),
           (HOSTILE_IDS[3], HOSTILE_IDS[5], HOSTILE_IDS[0]), (HOSTILE_IDS[3], HOSTILE_IDS[5], HOSTILE_IDS[1]),
           ("d", HOSTILE_IDS[2], "a"), ("d", HOSTILE_IDS[2], "b")]  # the last speaker's NUL: bad_record
    rows = [{"dataset": d, "speaker_id": s, "utterance_id": u, "path": str(p.relative_to(demo / "speech"))}
            for (d, s, u), p in zip(ids, wavs)]
    rows += [{"dataset": "d", "speaker_id": "s", "utterance_id": "u9", "path": "../../../etc/passwd"}]
    pd.DataFrame(rows).to_parquet(demo / "speech_manifest.parquet")
    table = pq.read_table(demo / "probe" / "a.parquet")
    cells = table.column("image").to_pylist()
    cells[:3] = [b"x", b"y", b"z"]  # replaced below by paths
    paths = pa.array([{"bytes": None, "path": p} for p in ["../../../etc/passwd", "/etc/passwd", "a\x00b.png"]]
                     + [{"bytes": c, "path": None} for c in cells[3:]])
    (demo / "probe" / "sub dir").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", paths),
                   demo / "probe" / "sub dir" / "ü..x.parquet", row_group_size=16)


def test_hostile_ids_and_paths_in_every_manifest_write_nothing_outside_results(tmp_path):
    work = demo_workdir(tmp_path / "hostile", copy=True)
    _hostile_inputs(work)
    config = default_config()
    config["speaker_embed"]["manifest"] = "resources/demo/speech_manifest.parquet"
    config["probe_qa"]["images_dir"] = "resources/demo/probe"
    before = {p for p in tmp_path.rglob("*")}
    etc_before = {p: p.stat().st_mtime_ns for p in Path("/etc").iterdir() if p.is_file()}
    run_snakemake(work, config)
    made = {p for p in tmp_path.rglob("*") if not p.is_dir()} - before
    outside = [p for p in made if not p.is_relative_to(work / "results") and not p.is_relative_to(work / ".snakemake")
               and p != work / "config.yaml"]
    assert outside == [], outside
    assert {p: p.stat().st_mtime_ns for p in Path("/etc").iterdir() if p.is_file()} == etc_before
    assert all(len(part.encode()) <= 255 for p in made for part in p.relative_to(work).parts)
    results = work / "results"

    def codes(pipeline: str) -> list[str]:
        return pd.read_parquet(results / pipeline / "failures.parquet")["reason_code"].tolist()

    assert codes("sku_index").count("unsafe_path") == 2
    assert codes("video_frames").count("unsafe_path") >= 2
    assert "unsafe_path" in codes("speaker_embed") and "bad_record" in codes("speaker_embed")
    symbols = set(pd.read_parquet(results / "kline_factor" / "library.parquet")["symbol"])
    assert {"ünï..cødé", "z" * 200} <= symbols
    probe_failures = pd.read_parquet(results / "probe_qa" / "failures.parquet")
    hostile_rows = probe_failures[probe_failures["item_id"].str.startswith("sub dir/ü..x.parquet:")]
    assert sorted(hostile_rows["reason_code"]) == ["unsafe_path"] * 3


# ---------------------------------------------------------------- broken configs


@pytest.mark.parametrize("change, message", [
    (lambda c: c["sku_index"].update(shards="two"), r"sku_index\.shards"),
    (lambda c: c["probe_qa"]["llm"].update(concurency=8), r"unknown key 'concurency' in probe_qa\.llm"),
    (lambda c: c["kline_factor"].update(prices_dir="no/such/folder"), r"kline_factor\.prices_dir: folder 'no/such/folder'"),
])
def test_a_broken_config_fails_before_any_job_naming_the_key(tmp_path, change, message):
    work = demo_workdir(tmp_path / "config")
    config = default_config()
    change(config)
    proc = run_snakemake(work, config, check=False)
    assert proc.returncode != 0 and re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not (work / "results").exists()  # no job started


# ---------------------------------------------------------------- the same on a real SLURM cluster

PROFILE = REPO / "profiles" / "slurm"


def _cluster_config() -> dict:
    from mlprep.config import only

    demo = REPO / "resources" / "demo"
    return {"sku_index": {"sku_data": str(demo / "sku" / "sku_data.json"), "images_dir": str(demo / "sku" / "images")},
            "video_frames": {"pairs": str(demo / "video" / "train_pairs.json"), "clips_dir": str(demo / "video" / "clips")},
            **only("sku_index", "video_frames")}


def _squeue(*states: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=60).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip() and (not states or line.split()[1] in states)]


def test_a_killed_slurm_run_resumes_to_the_local_runs_artefacts(slurm_cluster, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    cluster.mkdir()
    config = _cluster_config()
    run_snakemake(local, config)
    (cluster / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(cluster), "--configfile",
           str(cluster / "config.yaml"), "--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and proc.poll() is None:
        running = [j for j in _squeue("RUNNING") if "_" in j]  # an array task
        if running:
            break
        time.sleep(0.2)
    assert running and proc.poll() is None, "no array task was seen running"
    subprocess.run(["scancel", running[0]], check=True, timeout=60)
    os.killpg(proc.pid, signal.SIGKILL)  # the submitting snakemake and its children, no cleanup
    proc.wait(timeout=60)
    while _squeue() and time.time() < deadline + 300:  # what was already submitted runs out on its own
        time.sleep(1)
    assert not (cluster / "results" / "sku_index" / "index.faiss").exists()
    subprocess.run([*cmd, "--unlock"], capture_output=True, check=True, timeout=300)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert leftovers(cluster / "results") == []
    assert assert_same_artefacts(local / "results", cluster / "results") > 10
