"""Shared fixtures: a tiny CLIP architecture + checkpoint made here, tiny catalogs, and a workflow runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from mlprep.config import only

REPO = Path(__file__).resolve().parents[1]
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
AWKWARD_IDS = ["A/B", "../../escape", "..", ".", "50% off", "tea bag #2 ?x=1&y", "茶 ☕", "<b>x</b>&amp;", "a\\b"]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """A small open_clip architecture and a checkpoint of it, saved and later loaded through the real path."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny_clip")
    config_file = folder / "mlprep-tiny.json"
    config_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model = open_clip.create_model("mlprep-tiny", pretrained=None)
    checkpoint = folder / "mlprep-tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return {"name": "mlprep-tiny", "pretrained": str(checkpoint), "config_file": str(config_file)}


def make_catalog(folder: Path, n_skus: int, photos: int = 2) -> Path:
    from mlprep.demo import write_catalog

    return write_catalog(folder, n_skus, photos, size=(160, 120))


def workflow_config(workdir: Path, tiny_clip: dict, **sku_overrides) -> dict:
    sku = {
        "sku_data": str(workdir / "data" / "sku_data.json"),
        "images_dir": str(workdir / "data" / "images"),
        "shards": 2,
        "augment_per_image": 2,
        "encoding_batch_size": 8,
        "decode_workers": 1,
        "model": tiny_clip,
        "eval": {"queries_per_image": 1, "top_k": [1, 5]},
    }
    sku.update(sku_overrides)
    return {
        "seed": 7,
        "device": "cpu",
        "precision": "fp32",
        "continue_on_error": True,
        "sku_index": sku,
        **only("sku_index"),
    }


def run_snakemake(workdir: Path, config: dict, *args: str, check: bool = True, timeout: int = 600):
    """Run the real workflow in `workdir` with `config`; returns the CompletedProcess."""
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [
        SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config_path),
        "--cores",
        "2",
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def kill_mid_run(workdir: Path, config: dict, ready, cores: int = 2, timeout: float = 300) -> None:
    """Start the workflow in `workdir`, SIGKILL its whole process tree (no cleanup) as soon as `ready()` holds,
    then unlock the folder as a user would before running again."""
    import signal
    import time

    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--cores", str(cores)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    run_snakemake(workdir, config, "--unlock")


@pytest.fixture()
def sku_workdir(tmp_path) -> Path:
    make_catalog(tmp_path / "data", 6)
    return tmp_path


@pytest.fixture()
def s3_server(tmp_path, monkeypatch):
    """A real local S3 server over tmp_path/s3 (buckets: its subfolders), with the credentials in the
    environment (as a user would set them) for this test and the workflows it starts."""
    import mlprep.storage
    from mlprep.storage import LocalS3Server

    root = tmp_path / "s3"
    root.mkdir()
    server = LocalS3Server(root)
    monkeypatch.setattr(mlprep.storage, "_FILESYSTEMS", {})  # no client made with another test's credentials
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield server
    server.stop()


class Server:
    """tests/llm_server.py in its own process (real HTTP on 127.0.0.1); stats() are its request counts."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), *args],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats") as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture()
def server_factory():
    started = []

    def start(*args: str) -> Server:
        started.append(Server(*args))
        return started[-1]

    yield start
    for server in started:
        server.stop()


SLURM_SCRIPT = REPO / "tests" / "cluster" / "slurm_cluster.sh"


def pytest_collection_modifyitems(items):
    """The tests on the SLURM cluster first: the cluster then stays up for the session, and every later
    Snakemake start finds a controller instead of waiting 10 s for one (the SLURM plugin asks at import)."""
    items.sort(key=lambda item: "slurm_cluster" not in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def slurm_cluster():
    """Up until the whole session ends, not just this module: with SLURM installed, every Snakemake start
    imports the SLURM executor plugin, which asks `scontrol show config` for its help text and, when no
    controller answers, waits 10 s for it. Later tests' Snakemake runs would each pay that."""
    required = os.environ.get("MLPREP_REQUIRE_SLURM") == "1"
    missing = [d for d in ("slurmctld", "slurmd", "slurmdbd", "mariadbd", "munged") if not shutil.which(d)]
    if missing or os.geteuid() != 0:
        reason = f"needs root and SLURM installed (missing: {missing or 'root'}); `make test` installs it as root"
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    # Not under pytest's tmp folders: those are private to root, and munge and mysql run as their own users.
    base = Path(tempfile.mkdtemp(prefix="mlprep-slurm-"))
    env = {**os.environ, "SLURM_BASE": str(base)}
    try:
        subprocess.run(["bash", str(SLURM_SCRIPT), "start"], env=env, check=True, timeout=300)
        yield base
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=env, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def hostile_demo(tmp_path_factory) -> Path:
    """The default workflow over the demo data in 3 shards a pipeline (4 for the validation clips, so that one is
    empty), with one SKU named with markup, nine SKU ids that are awkward in URLs, a missing and a broken clip.
    Served by test_serve; its tables checked by test_tables."""
    work = tmp_path_factory.mktemp("served")
    demo_dir = work / "resources" / "demo"
    demo_dir.mkdir(parents=True)
    for part in (REPO / "resources" / "demo").iterdir():
        if part.name in ("sku", "video"):
            shutil.copytree(part, demo_dir / part.name)
        else:
            (demo_dir / part.name).symlink_to(part)
    catalog = json.loads((demo_dir / "sku" / "sku_data.json").read_text())
    catalog[4]["name"] = HOSTILE
    from mlprep.demo import product_photo

    for n, sku_id in enumerate(AWKWARD_IDS):  # ids the workflow takes and every URL must carry intact
        image = f"awkward{n}.jpg"
        product_photo(f"awkward{n}", 0, (320, 240), 5).save(demo_dir / "sku" / "images" / image, quality=90)
        catalog.append({"sku_id": sku_id, "name": f"awkward {n}", "category": "test", "images": [image]})
    (demo_dir / "sku" / "sku_data.json").write_text(json.dumps(catalog))
    pairs = json.loads((demo_dir / "video" / "train_pairs.json").read_text())  # two clips that cannot be used
    (demo_dir / "video" / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    pairs += [{"clip": "gone.mp4", "text": "a clip that is not there"}, {"clip": "broken.mp4", "text": "broken"}]
    (demo_dir / "video" / "train_pairs.json").write_text(json.dumps(pairs))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for pipeline in ("sku_index", "speaker_embed", "kline_factor", "probe_qa"):
        config[pipeline]["shards"] = 3
    config["probe_qa"]["qa"]["shards"] = 3
    config["video_frames"]["shards"] = {"train": 3, "val": 4}
    run_snakemake(work, config)
    return work
