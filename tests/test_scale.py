"""The shard pattern at scale: shard lists, their fingerprints, the catalog cache, items_per_shard, remote jobs,
and a small run of the DAG benchmark as a correctness check (job counts, no-op reruns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SNAKEMAKE, run_snakemake, workflow_config
from mlprep.ids import shard_of, shards_of
from mlprep.sharding import shard_count, shard_names
from mlprep.shardlists import ShardLists, encode_lines, file_digest
from mlprep.sku.catalog import LIST_COLUMNS, load_catalog, read_catalog, sync_lists


def test_shards_of_equals_shard_of():
    ids = [f"sku{i}/img{i % 7}.jpg" for i in range(3000)] + ["ünï/çødé.jpg", ""]
    assert shards_of(ids, 13).tolist() == [shard_of(i, 13) for i in ids]


def test_shard_count_is_a_power_of_two_that_holds_the_items():
    assert [shard_count(n, 100) for n in (0, 1, 100, 101, 250, 400, 401)] == [1, 1, 1, 2, 4, 4, 8]
    with pytest.raises(ValueError):
        shard_count(10, 0)


def test_json_lines_round_trip_hostile_strings(tmp_path):
    values = ["plain", 'quote " and \\ backslash', "tab\tnew\nline", "ünïcödé", "\x00nul"]
    lines = encode_lines({"a": ("str", values), "n": ("int", range(5)), "x": ("num", [1.5, None, 0.0, 2, None])})
    assert [json.loads(line) for line in lines] == [[v, i, x] for v, i, x in zip(values, range(5),
                                                                                  [1.5, None, 0.0, 2, None])]


def test_lists_are_rewritten_only_where_their_shard_changed(tmp_path):
    lists = ShardLists(tmp_path / "lists", shard_names(3), ["v"])
    lines = [f'["item{i}"]' for i in range(9)]
    shard = np.array([i % 3 for i in range(9)])
    assert lists.sync(shard, lines) == shard_names(3)
    mtimes = {n: lists.path(n).stat().st_mtime_ns for n in lists.names}
    time.sleep(0.01)
    assert lists.sync(shard[::-1].copy(), lines[::-1]) == []  # the input order does not matter
    assert lists.sync(np.append(shard, 1), [*lines, '["new"]']) == ["001-of-003"]
    assert {n: lists.path(n).stat().st_mtime_ns for n in lists.names if n != "001-of-003"} == \
        {n: t for n, t in mtimes.items() if n != "001-of-003"}
    assert lists.fingerprints()["001-of-003"] == file_digest(lists.path("001-of-003"))
    assert ShardLists.read(lists.path("001-of-003"), ["v"])[-1] == {"v": "new"}
    ShardLists(tmp_path / "lists", shard_names(2), ["v"]).sync(np.array([0, 1]), ['["a"]', '["b"]'])
    assert sorted(p.name for p in (tmp_path / "lists").glob("*.jsonl")) == ["000-of-002.jsonl", "001-of-002.jsonl"]


def test_sync_follows_edits_and_uses_the_cache(tmp_path):
    from mlprep.demo import write_catalog

    write_catalog(tmp_path, 6, 2, size=(64, 48))
    lists = ShardLists(tmp_path / "lists", shard_names(4), LIST_COLUMNS)
    first = sync_lists(tmp_path / "sku_data.json", tmp_path / "images", lists)
    assert (tmp_path / "lists" / "catalog.parquet").exists()
    assert sync_lists(tmp_path / "sku_data.json", tmp_path / "images", lists) == first
    image = tmp_path / "images" / "sku0003_1.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    edited = sync_lists(tmp_path / "sku_data.json", tmp_path / "images", lists)
    assert [n for n in first if first[n] != edited[n]] == [f"{shard_of('sku0003/sku0003_1.jpg', 4):03d}-of-004"]
    image.unlink()
    catalog = load_catalog(tmp_path / "sku_data.json", tmp_path / "images", 4, tmp_path / "lists")
    assert [(f.item_id, f.reason_code) for f in catalog.failures] == [("sku0003/sku0003_1.jpg", "missing")]
    assert len(catalog.items) == 11 == len(read_catalog(tmp_path / "sku_data.json", tmp_path / "images", 4).items)


@pytest.mark.slow
def test_editing_an_image_reruns_its_shard_and_renaming_a_sku_only_the_merge(sku_workdir, tiny_clip):
    from test_workflow import _dry_run_jobs

    config = workflow_config(sku_workdir, tiny_clip, shards=4)
    run_snakemake(sku_workdir, config)
    image = sku_workdir / "data" / "images" / "sku0002_0.jpg"
    image.write_bytes(image.read_bytes())  # same bytes, new mtime: an edit as make sees it
    skus = json.loads((sku_workdir / "data" / "sku_data.json").read_text())
    skus[4]["name"] = "A new name"
    (sku_workdir / "data" / "sku_data.json").write_text(json.dumps(skus))
    jobs = _dry_run_jobs(sku_workdir, config)
    assert jobs["sku_encode_shard"] == [f"{shard_of('sku0002/sku0002_0.jpg', 4):03d}-of-004"]
    run_snakemake(sku_workdir, config)
    import pandas as pd

    meta = pd.read_parquet(sku_workdir / "results" / "sku_index" / "metadata.parquet")
    assert set(meta.loc[meta["sku_id"] == skus[4]["sku_id"], "name"]) == {"A new name"}


@pytest.mark.slow
def test_items_per_shard_sets_the_count_and_a_remote_job_reads_only_its_list(sku_workdir, tiny_clip):
    config = workflow_config(sku_workdir, tiny_clip, items_per_shard=5)  # 12 images -> 4 shards
    config["sku_index"].pop("shards")
    proc = run_snakemake(sku_workdir, config, "-n")
    assert proc.stdout.count("rule sku_encode_shard:") == 4 and "003-of-004" in proc.stdout
    # a job on a cluster node: its own list only, so a catalog that is unreadable now does not matter
    (sku_workdir / "data" / "sku_data.json").write_text("{ not json")
    lists = sku_workdir / "results" / "sku_index" / "lists"
    before = {p.name: p.stat().st_mtime_ns for p in lists.iterdir()}
    cmd = [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(sku_workdir), "--configfile",
           str(sku_workdir / "config.yaml"), "--cores", "1", "--target-jobs", "sku_encode_shard:shard=002-of-004",
           "--mode", "remote", "--force"]
    remote = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert remote.returncode == 0, remote.stdout[-2000:] + remote.stderr[-4000:]
    assert (sku_workdir / "results" / "sku_index" / "shards" / "002-of-004" / "embeddings.npy").exists()
    assert {p.name: p.stat().st_mtime_ns for p in lists.iterdir()} == before


@pytest.mark.slow
def test_dag_benchmark_small_scale_gives_the_right_jobs_and_no_op_reruns(tmp_path):
    """bench/dag_scale.py at a small size: a check of the DAG's shape, not a timing."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dag_scale.py"), "--sizes", "500:7", "--check",
                           "--items-per-tar", "100", "--data", str(tmp_path), "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "figures.json").read_text())
    assert [(r["pipeline"], r["items"], r["ours"]["shard_jobs"]) for r in rows] == [
        ("sku_index", 500, 7), ("sku_index:tars", 500, 7), ("video_frames", 500, 7)]
    for row in rows:
        pipeline = row["pipeline"].split(":")[0]
        work = tmp_path / "work" / f"{row['pipeline'].replace(':', '_')}_500_7"
        lists = Path(work / "results" / pipeline / "lists")
        listed = sum(1 for p in lists.rglob("*.jsonl") for line in p.read_text().splitlines() if line)
        assert listed == 500
