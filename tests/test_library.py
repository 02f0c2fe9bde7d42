"""Unit tests of the shared library pieces."""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import pandas as pd
import pytest
import torch

from mlprep import devices
from mlprep.failures import FailureLog, ItemFailedError, read_failures, write_failures
from mlprep.ids import UnsafePathError, resolve_inside, safe_filename, shard_of, stable_hash
from mlprep.io import atomic_path, load_npy, save_npy, write_json, write_parquet
from mlprep.rng import derive_seed, rng_for
from mlprep.stats import ShardStats


def test_stable_hash_is_fixed_across_runs():
    # A fixed value: changing the hash would silently reshuffle every user's shards.
    assert stable_hash("sku0001/a.jpg") == stable_hash("sku0001/a.jpg")
    assert stable_hash("abc") == 0xD8BB14D833D59559
    assert shard_of("abc", 7) == stable_hash("abc") % 7


def test_shard_of_spreads_and_ignores_position():
    ids = [f"item{i}" for i in range(2000)]
    counts = np.bincount([shard_of(i, 8) for i in ids], minlength=8)
    assert counts.min() > 180  # roughly uniform
    assert [shard_of(i, 8) for i in reversed(ids)] == [shard_of(i, 8) for i in ids][::-1]
    with pytest.raises(ValueError):
        shard_of("x", 0)


@pytest.mark.parametrize("raw", ["../../etc/x", "/abs/path", "a/b\\c", "..", ".", "", "x" * 500, "ok name?.jpg"])
def test_safe_filename_never_escapes(raw, tmp_path):
    name = safe_filename(raw)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(name) <= 96
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_filename_keeps_clean_ids_and_separates_dirty_ones():
    assert safe_filename("sku-001_A.v2") == "sku-001_A.v2"
    assert safe_filename("a/b") != safe_filename("a_b")


def test_resolve_inside(tmp_path):
    (tmp_path / "img").mkdir()
    assert resolve_inside(tmp_path / "img", "a/b.jpg") == (tmp_path / "img" / "a" / "b.jpg").resolve()
    for bad in ["../x.jpg", "/etc/passwd", "a/../../x", "", "a\x00.jpg"]:
        with pytest.raises(UnsafePathError):
            resolve_inside(tmp_path / "img", bad)
    # a link the folder's owner placed inside it is followed: data folders of links are common
    (tmp_path / "elsewhere.jpg").write_bytes(b"x")
    (tmp_path / "img" / "link.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    assert resolve_inside(tmp_path / "img", "link.jpg").read_bytes() == b"x"
    assert resolve_inside(tmp_path / "img", "sub/../link.jpg") == resolve_inside(tmp_path / "img", "link.jpg")


def test_rng_depends_on_every_key_only():
    assert derive_seed(1, "aug", "id", 3) == derive_seed(1, "aug", "id", 3)
    assert len({derive_seed(1, "aug", "id", 3), derive_seed(2, "aug", "id", 3), derive_seed(1, "q", "id", 3),
                derive_seed(1, "aug", "id2", 3), derive_seed(1, "aug", "id", 4)}) == 5
    assert rng_for(5, "x").uniform() == rng_for(5, "x").uniform()


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "data.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed half-way")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_writers_round_trip(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_npy(arr, tmp_path / "a.npy")
    np.testing.assert_array_equal(load_npy(tmp_path / "a.npy"), arr)
    write_json({"b": 1}, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == {"b": 1}
    write_parquet(pd.DataFrame({"symbol": ["a", "b"], "path": ["a.csv", "b.csv"], "shard": [0, 1], "size": [1, 2],
                                "mtime_ns": [3, 4]}), tmp_path / "c.parquet", "kline.manifest")
    assert pd.read_parquet(tmp_path / "c.parquet")["shard"].tolist() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.json", "c.parquet"]


def test_load_npy_refuses_pickles(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(path)


def test_failure_log_records_or_raises_with_the_path(tmp_path):
    log = FailureLog(continue_on_error=True)
    log.record("sku1/a.jpg", "/data/a.jpg", "decode", "truncated", "image data ends early")
    write_failures(log.records, tmp_path / "f.parquet")
    frame = read_failures([tmp_path / "f.parquet"])
    assert frame["id"].isna().all()  # the item's own dataset id: none here
    assert frame.drop(columns="id").to_dict("records") == [
        {"item_id": "sku1/a.jpg", "path": "/data/a.jpg", "stage": "decode", "reason_code": "truncated",
         "reason": "image data ends early"}
    ]
    strict = FailureLog(continue_on_error=False)
    with pytest.raises(ItemFailedError, match="/data/b.jpg"):
        strict.record("sku1/b.jpg", "/data/b.jpg", "decode", "truncated", "image data ends early")
    with pytest.raises(ValueError, match="unknown failure reason code"):
        log.record("x", "/x", "decode", "Truncated", "codes are a fixed vocabulary")


def test_empty_failures_table_has_its_columns(tmp_path):
    write_failures([], tmp_path / "f.parquet")
    assert list(pd.read_parquet(tmp_path / "f.parquet").columns) == ["item_id", "path", "stage", "reason_code", "reason",
                                                                       "id"]


def test_shard_stats(tmp_path):
    stats = ShardStats("000-of-002", ok=3, failed=1, counts={"views": 12})
    data = stats.write(tmp_path / "s.json")
    assert data["items_ok"] == 3 and data["items_failed"] == 1 and data["items_skipped"] == 0
    assert data["seconds"] >= 0 and "items_per_s" in data and "views_per_s" in data
    assert json.loads((tmp_path / "s.json").read_text())["views"] == 12


def test_device_and_precision_selection(monkeypatch):
    assert devices.select_device("cpu").type == "cpu"
    assert devices.select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA"):
        devices.select_device("cuda:1")
    cpu = torch.device("cpu")
    assert devices.select_precision("fp32", cpu) == torch.float32
    assert devices.select_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        devices.select_precision("fp16", cpu)
    for flags, expected in [
        ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
        ({"avx2", "avx512f"}, torch.float32),
    ]:
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert devices.select_precision("auto", cpu) == expected, flags


def test_cpu_flags_are_read_from_proc():
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    assert devices.cpu_flags() == frozenset(line.split(":", 1)[1].split())


def test_auto_decode_workers_leave_the_feeding_process_a_core():
    import torch

    from mlprep.workers import resolve_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [resolve_workers("auto", cpu, t) for t in (1, 2, 4, 16)] == [0, 0, 1, 1]
    # on a GPU: 16 workers on 16 cores ran at 0.41x the rate of 4 (H200, 2026-12-04)
    assert [resolve_workers("auto", gpu, t) for t in (1, 2, 3, 5, 16, 64)] == [1, 1, 2, 4, 4, 4]
    assert resolve_workers(7, gpu, 16) == 7 and resolve_workers("3", cpu, 2) == 3


_MAPPED_BLOCKS = """
import ctypes, json, sys
import numpy as np, torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped(mib):  # blocks the allocator maps apart from its heap while one of `mib` MiB is held
    before = libc.mallinfo2().hblks
    block = np.ones(mib << 20, np.uint8)
    during = libc.mallinfo2().hblks
    del block
    return during - before

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, k):
        return mapped(24)

from mlprep.workers import in_order
fresh = mapped(16)  # glibc as it starts: mapped, and its threshold then follows the largest freed block (16 MiB)
readers = list(in_order(Items(), workers=1))
print(json.dumps({"fresh": fresh, "readers": readers, "here": mapped(28)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_readers_and_their_job_reuse_the_memory_they_free(tmp_path):
    """A reader's photo (its decode, its SIFT pyramid) or a chunk's render allocates blocks of MiBs; glibc maps each
    anew and unmaps it when freed, so every item paid its pages again (a third of a sku reader's time with local
    features). Once a job's readers start (mlprep.workers.in_order), the job's process and its reader processes
    take such blocks from their heap."""
    import subprocess
    import sys

    script = tmp_path / "mapped.py"
    script.write_text(_MAPPED_BLOCKS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures == {"fresh": 1, "readers": [0, 0], "here": 0}, figures
