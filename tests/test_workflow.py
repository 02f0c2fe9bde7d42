"""Workflow tests: lint, format, dry-run, and real runs of the sku_index pipeline on tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, kill_mid_run, make_catalog, run_snakemake, workflow_config
from mlprep.ids import shard_of

pytestmark = pytest.mark.slow


def _files_outside(workdir: Path, allowed=("results", ".snakemake", "data", "config.yaml")) -> list[Path]:
    return [p for p in workdir.rglob("*") if p.is_file() and p.relative_to(workdir).parts[0] not in allowed]


def _index(workdir: Path):
    import faiss

    folder = workdir / "results" / "sku_index"
    index = faiss.read_index(str(folder / "index.faiss"))
    vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, 0))
    return vectors, pd.read_parquet(folder / "metadata.parquet"), folder


def test_snakemake_lint_is_clean():
    proc = subprocess.run([SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_snakefmt_check_passes():
    snakefmt = str(Path(sys.executable).with_name("snakefmt"))
    proc = subprocess.run([snakefmt, "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_config_dry_run_lists_every_job():
    proc = subprocess.run([SNAKEMAKE, "-n", "--forceall"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for rule in ["sku_manifest", "sku_encode_shard", "sku_build_index", "sku_evaluate"]:
        assert rule in out
    assert "000-of-002" in out and "001-of-002" in out


def test_bad_config_is_caught_before_any_job(sku_workdir, tiny_clip):
    config = workflow_config(sku_workdir, tiny_clip, shards=0)
    proc = run_snakemake(sku_workdir, config, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "shards" in out and "minimum" in out and "sku_manifest" not in out


def _write_query_photos(workdir: Path) -> dict:
    """Users' own query photos (eval.queries): two readable ones, one that is no image, one of a SKU the catalog
    lacks."""
    folder = workdir / "data" / "queries"
    folder.mkdir()
    images = workdir / "data" / "images"
    (folder / "a.jpg").write_bytes((images / "sku0003_1.jpg").read_bytes())
    (folder / "b.jpg").write_bytes((images / "sku0001_0.jpg").read_bytes())
    (folder / "junk.jpg").write_bytes(b"not an image")
    (folder / "other.jpg").write_bytes((images / "sku0004_0.jpg").read_bytes())
    truth = pd.DataFrame({"image": ["a.jpg", "b.jpg", "junk.jpg", "other.jpg"],
                          "sku_id": ["sku0003", "sku0001", "sku0002", "sku9999"]})
    truth.to_csv(workdir / "data" / "truth.csv", index=False)
    return {"images_dir": str(folder), "truth": str(workdir / "data" / "truth.csv")}


def test_full_run_on_tiny_data(sku_workdir, tiny_clip):
    queries = _write_query_photos(sku_workdir)
    config = workflow_config(sku_workdir, tiny_clip, eval={"queries_per_image": 1, "top_k": [1, 5], "queries": queries})
    run_snakemake(sku_workdir, config)
    vectors, meta, folder = _index(sku_workdir)
    assert len(vectors) == 6 * 2 * (1 + 2) == len(meta)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert sorted(meta["view"].unique()) == [0, 1, 2]
    assert meta.groupby("item_id").size().eq(3).all()
    assert meta["sku_id"].nunique() == 6
    np.testing.assert_array_equal(np.load(folder / "embeddings.npy"), vectors)
    # the same rows in the layout autofaiss and clip-retrieval read: img_emb/*.npy beside metadata/*.parquet
    parts = folder / "embedding_parts"
    np.testing.assert_array_equal(np.load(parts / "img_emb" / "img_emb_00000.npy"), vectors)
    rows = pd.read_parquet(parts / "metadata" / "metadata_00000.parquet")
    assert rows["item_id"].tolist() == meta["item_id"].tolist() and rows["image_path"].tolist() == meta["image"].tolist()
    info = json.loads((folder / "index_info.json").read_text())
    assert info["ntotal"] == 36 and info["dim"] == 32 and info["n_failures"] == 0
    result = json.loads((folder / "eval.json").read_text())
    photos = result["query_photos"]  # the junk photo is a miss; the SKU the catalog lacks is left out
    assert {k: photos[k] for k in ("n_queries", "n_failed", "n_not_in_catalog")} == {
        "n_queries": 3, "n_failed": 1, "n_not_in_catalog": 1}
    assert photos["reranked"]["top5"] == photos["embedding"]["top5"] == 2 / 3
    asked = pd.read_parquet(folder / "query_photos.parquet")
    assert asked["status"].tolist() == ["ok", "ok", "failed", "ok"] and asked["in_catalog"].tolist() == [True] * 3 + [False]
    assert asked["reason_code"][2] == "not_an_image" and "junk.jpg" in asked["error"][2]
    assert [len(top) for top in asked["embedding_top"]] == [5, 5, 0, 5]
    assert result["n_queries"] == result["n_held_out_views"] == 12 and 0 <= result["augmented_exact"]["top1"] <= 1
    assert (folder / "eval.png").stat().st_size > 1000
    floor = result["shop_floor"]  # one shop-floor query a photo, each SKU has two photos: none left out
    assert floor["n_queries"] == 12 and floor["n_left_out_single_photo"] == 0
    assert set(floor["embedding"]) == set(floor["reranked"]) == {"top1", "top5"} and "left out" in floor["protocol"]
    photos = pd.read_parquet(folder / "local_features.parquet")
    assert sorted(photos["item_id"]) == sorted(meta[meta["view"] == 0]["item_id"]) and (photos["count"] > 0).all()
    assert len(np.load(folder / "local_features_descriptors.npy")) == photos["count"].sum()
    for shard in ["000-of-002", "001-of-002"]:
        stats = json.loads((folder / "shards" / shard / "stats.json").read_text())
        assert {"items_ok", "items_failed", "items_skipped", "seconds", "items_per_s", "views_per_s"} <= set(stats)
        # 12 photos, under eval.shop_floor.max_queries: every one gets its query; where the readers' time went
        assert stats["shop_floor_share"] == 1 and stats["shop_floor_embed_seconds"] > 0
        assert set(stats["reader_seconds"]) == {"read", "views", "local_features", "shop_floor"}
        assert (sku_workdir / "results" / "logs" / "sku_index" / f"encode_{shard}.log").exists()
        assert (sku_workdir / "results" / "benchmarks" / "sku_index" / f"encode_{shard}.tsv").exists()
    assert _files_outside(sku_workdir) == []

    # the search command finds the SKU of an image that is in the index
    image = sku_workdir / "data" / "images" / "sku0003_1.jpg"
    mlprep = str(Path(sys.executable).with_name("mlprep"))
    proc = subprocess.run(
        [mlprep, "search-sku", "--index", str(folder / "index.faiss"), "--k", "3", "--json", str(image)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    hits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(hits) == 3 and hits[0]["sku_id"] == "sku0003" and hits[0]["score"] > 0.9
    # the eval searched the same photo through the same path: the same answer
    assert [h["sku_id"] for h in hits] == list(asked["reranked_top"][0][:3])
    # one unreadable query does not cost the good ones their answers; each bad one is reported
    (sku_workdir / "junk.jpg").write_bytes(b"not an image")
    queries = [str(image), str(sku_workdir / "nope.jpg"), str(sku_workdir / "junk.jpg")]
    proc = subprocess.run([mlprep, "search-sku", "--index", str(folder / "index.faiss"), "--k", "2", "--json", *queries],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(h["query"], h["rank"], h["sku_id"]) for h in lines[:2]] == [(str(image), 1, "sku0003"), (str(image), 2, hits[1]["sku_id"])]
    assert lines[2:] == [
        {"query": queries[1], "reason_code": "missing", "error": f"{queries[1]}: image file not found"},
        {"query": queries[2], "reason_code": "not_an_image", "error": lines[3]["error"]},
    ]
    assert "nope.jpg" in proc.stderr and "junk.jpg" in proc.stderr and "2 of 3 query images" in proc.stderr
    proc = subprocess.run([mlprep, "search-sku", "--index", str(folder / "index.faiss"), "--k", "0", str(image)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--k: must be at least 1" in proc.stderr and proc.stdout == ""

    # a smaller eval.max_queries reruns the eval alone, over a seeded sample of the held-out views
    config["sku_index"]["eval"]["max_queries"] = 5
    proc = run_snakemake(sku_workdir, config)
    jobs = proc.stdout + proc.stderr
    assert "rule sku_evaluate:" in jobs and "rule sku_encode_shard:" not in jobs and "rule sku_build_index:" not in jobs
    sampled = json.loads((folder / "eval.json").read_text())
    assert sampled["n_queries"] == 5 and sampled["n_held_out_views"] == 12
    assert sampled["shop_floor"] == result["shop_floor"]


SAME_ARTEFACTS = ["index.faiss", "embeddings.npy", "query_embeddings.npy", "shop_floor_embeddings.npy",
                  "local_features_descriptors.npy", "eval.json", "embedding_parts/img_emb/img_emb_00000.npy"]


def test_tars_parquet_and_a_bucket_of_the_images_give_the_artefacts_of_the_files(tmp_path, tiny_clip, s3_server):
    """The same images as files, as webdataset tars (with bad containers beside them), as parquet of bytes, and both
    in a bucket of a real S3 server: byte-identical index, embeddings and eval; every bad container or member one
    failure record; nothing written outside results/."""
    import io
    import tarfile

    from mlprep.demo import pack_files

    make_catalog(tmp_path / "data", 6)
    runs = {}
    for form in ("files", "webdataset", "parquet", "s3-webdataset", "s3-parquet"):
        fmt = form.removeprefix("s3-")
        work = tmp_path / form
        (work / "data").mkdir(parents=True)
        images = str(tmp_path / "data" / "images")
        if form.startswith("s3-"):
            pack_files(tmp_path / "data" / "images", s3_server.root / "bucket" / fmt, fmt, per_container=5)
            images = f"s3://bucket/{fmt}"
        elif fmt != "files":
            images = str(work / "data" / "containers")
            pack_files(tmp_path / "data" / "images", images, fmt, per_container=5)
        if form == "webdataset":
            with tarfile.open(f"{images}/evil.tar", "w") as archive:
                info = tarfile.TarInfo("../../outside.jpg")
                info.size = 4
                archive.addfile(info, io.BytesIO(b"evil"))
            Path(f"{images}/junk.tar").write_bytes(b"not a tar" * 100)
        config = workflow_config(work, tiny_clip, sku_data=str(tmp_path / "data" / "sku_data.json"),
                                 images_dir=images, input_format=fmt)
        config["object_storage"] = s3_server.storage
        run_snakemake(work, config)
        runs[form] = work / "results" / "sku_index"
        assert _files_outside(work) == []
        logs = "".join(p.read_text(errors="replace") for p in (work / "results" / "logs").rglob("*.log"))
        assert s3_server.SECRET not in logs
    for form in ("webdataset", "parquet", "s3-webdataset", "s3-parquet"):
        for name in SAME_ARTEFACTS:
            assert (runs[form] / name).read_bytes() == (runs["files"] / name).read_bytes(), (form, name)
        pd.testing.assert_frame_equal(pd.read_parquet(runs[form] / "metadata.parquet"),
                                      pd.read_parquet(runs["files"] / "metadata.parquet"))
    failures = pd.read_parquet(runs["webdataset"] / "failures.parquet")
    assert sorted(failures["reason_code"]) == ["bad_container", "unsafe_path"]
    assert failures["path"].str.endswith("evil.tar#../../outside.jpg").any()
    for form in ("files", "s3-webdataset", "s3-parquet"):
        assert len(pd.read_parquet(runs[form] / "failures.parquet")) == 0
    manifest = pd.read_parquet(runs["s3-webdataset"] / "manifest.parquet")
    assert manifest["path"].str.match(r"^s3://bucket/webdataset/0000\d\.tar#sku0\d+_\d\.jpg$").all()


def test_wrong_credentials_stop_the_run_before_any_job_naming_the_bucket(tmp_path, tiny_clip, s3_server, monkeypatch):
    from mlprep.demo import pack_files

    make_catalog(tmp_path / "data", 2)
    pack_files(tmp_path / "data" / "images", s3_server.root / "bucket" / "tars", "webdataset")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    config = workflow_config(tmp_path, tiny_clip, images_dir="s3://bucket/tars", input_format="webdataset")
    config["object_storage"] = {**s3_server.storage, "max_attempts": 2}
    proc = run_snakemake(tmp_path, config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "s3://bucket/tars: access denied" in out and "AWS_SECRET_ACCESS_KEY" in out
    assert "wrong-secret-value" not in out
    assert not (tmp_path / "results" / "sku_index" / "manifest.parquet").exists()
    assert not (tmp_path / "results" / "sku_index" / "shards").exists()


def test_a_truth_table_that_cannot_be_used_stops_the_run_before_any_job(sku_workdir, tiny_clip):
    queries = _write_query_photos(sku_workdir)
    pd.DataFrame({"photo": ["a.jpg"], "sku_id": ["sku0003"]}).to_csv(queries["truth"], index=False)
    config = workflow_config(sku_workdir, tiny_clip, eval={"queries_per_image": 1, "top_k": [1, 5], "queries": queries})
    proc = run_snakemake(sku_workdir, config, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "truth.csv: no column 'image'" in out and "sku_manifest" not in out
    pd.DataFrame({"image": ["a.jpg", "gone.jpg"], "sku_id": ["sku0003", "sku0001"]}).to_csv(queries["truth"], index=False)
    proc = run_snakemake(sku_workdir, config, "-n", check=False)
    assert proc.returncode != 0 and "gone.jpg" in proc.stdout + proc.stderr  # a photo that is not there: named


def _write_bad_catalog(workdir: Path) -> None:
    data_dir = workdir / "data"
    skus = json.loads((data_dir / "sku_data.json").read_text())
    good = (data_dir / "images" / "sku0000_0.jpg").read_bytes()
    (data_dir / "images" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (data_dir / "images" / "junk.jpg").write_bytes(b"\x00garbage, not a jpeg")
    skus += [
        {"sku_id": "broken", "images": ["trunc.jpg", "junk.jpg", "missing.jpg"]},
        {"sku_id": "empty", "images": []},
        {"sku_id": "sku0001", "images": ["sku0002_0.jpg"]},  # duplicate id
        {"sku_id": "../../etc/x", "images": ["sku0004_0.jpg"]},
        {"sku_id": "/abs/path", "images": ["../../../../etc/passwd"]},
    ]
    (data_dir / "sku_data.json").write_text(json.dumps(skus))


def test_bad_inputs_become_failure_records(sku_workdir, tiny_clip):
    _write_bad_catalog(sku_workdir)
    index = {"factory": "IVF4,Flat", "search_params": "nprobe=4", "train_sample": 1000, "recall_sample": 100}
    run_snakemake(sku_workdir, workflow_config(sku_workdir, tiny_clip, index=index))
    vectors, meta, folder = _index(sku_workdir)
    assert len(vectors) == (12 + 1) * 3  # 12 good images + the one of SKU '../../etc/x'
    assert "../../etc/x" in set(meta["sku_id"])
    failures = pd.read_parquet(folder / "failures.parquet")
    by_item = dict(zip(failures["item_id"], failures["stage"]))
    assert by_item["broken/trunc.jpg"] == "decode" and by_item["broken/junk.jpg"] == "decode"
    assert by_item["broken/missing.jpg"] == "manifest" and by_item["empty"] == "manifest"
    assert by_item["sku0001"] == "manifest" and by_item["%2Fabs%2Fpath/../../../../etc/passwd"] == "manifest"
    assert len(failures) == 6
    codes = dict(zip(failures["item_id"], failures["reason_code"]))
    assert codes == {"broken/trunc.jpg": "truncated", "broken/junk.jpg": "not_an_image", "broken/missing.jpg": "missing",
                     "empty": "no_images", "sku0001": "duplicate_id",
                     "%2Fabs%2Fpath/../../../../etc/passwd": "unsafe_path"}
    assert not any(r.startswith(("RuntimeError", "OSError")) for r in failures["reason"])
    info = json.loads((folder / "index_info.json").read_text())
    assert info["failures_by_code"] == {code: 1 for code in codes.values()}
    assert info["n_failures"] == 6 and info["factory"] == "IVF4,Flat" and not info["exact"]
    assert info["recall_at_10"] == 1.0  # nprobe covers every list: the approximate index is exact here
    result = json.loads((folder / "eval.json").read_text())
    assert result["recall_at_10"] == 1.0 and result["augmented_index"] == result["augmented_exact"]
    assert _files_outside(sku_workdir) == []


def test_without_continue_on_error_the_job_fails_naming_the_file(sku_workdir, tiny_clip):
    data_dir = sku_workdir / "data"
    (data_dir / "images" / "junk.jpg").write_bytes(b"not an image")
    skus = json.loads((data_dir / "sku_data.json").read_text()) + [{"sku_id": "junk", "images": ["junk.jpg"]}]
    (data_dir / "sku_data.json").write_text(json.dumps(skus))
    config = workflow_config(sku_workdir, tiny_clip)
    config["continue_on_error"] = False
    proc = run_snakemake(sku_workdir, config, check=False)
    assert proc.returncode != 0
    assert "junk.jpg" in proc.stdout + proc.stderr  # show-failed-logs prints the log naming the file
    assert not (sku_workdir / "results" / "sku_index" / "index.faiss").exists()


def test_empty_catalog_fails_the_run_after_writing_the_failure(sku_workdir, tiny_clip):
    (sku_workdir / "data" / "sku_data.json").write_text("[]")
    config = workflow_config(sku_workdir, tiny_clip)
    config["max_failed_fraction"] = 1.0  # even with the share test off, an empty result fails
    proc = run_snakemake(sku_workdir, config, check=False)
    assert proc.returncode != 0
    assert "sku_index: no item succeeded (1 failed); most common reason: empty_list" in proc.stdout + proc.stderr
    vectors, meta, folder = _index(sku_workdir)
    assert len(vectors) == 0 and len(meta) == 0
    [failure] = pd.read_parquet(folder / "failures.parquet").to_dict("records")
    assert "no SKUs" in failure["reason"] and failure["path"].endswith("sku_data.json")
    assert failure["reason_code"] == "empty_list"
    assert not (folder / "eval.json").exists() and not (folder / "check.json").exists()


def _dry_run_jobs(workdir: Path, config: dict) -> dict[str, list[str]]:
    proc = run_snakemake(workdir, config, "-n")
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
            jobs.setdefault(rule, [])
        elif line.startswith("wildcards:") and rule:
            jobs[rule].append(line.split("shard=")[1])
    return jobs


def test_adding_two_skus_reruns_only_their_shards(sku_workdir, tiny_clip):
    config = workflow_config(sku_workdir, tiny_clip, shards=4)
    run_snakemake(sku_workdir, config)
    assert _dry_run_jobs(sku_workdir, config) == {}
    shards_dir = sku_workdir / "results" / "sku_index" / "shards"
    before = {p: p.stat().st_mtime_ns for p in shards_dir.rglob("*") if p.is_file()}

    from mlprep.demo import product_photo

    data_dir = sku_workdir / "data"
    skus = json.loads((data_dir / "sku_data.json").read_text())
    for sku_id in ["new-a", "new-b"]:
        product_photo(sku_id, 0, (160, 120)).save(data_dir / "images" / f"{sku_id}.jpg")
        skus.append({"sku_id": sku_id, "images": [f"{sku_id}.jpg"]})
    (data_dir / "sku_data.json").write_text(json.dumps(skus))
    touched = sorted({f"{shard_of(f'{s}/{s}.jpg', 4):03d}-of-004" for s in ["new-a", "new-b"]})

    jobs = _dry_run_jobs(sku_workdir, config)
    assert sorted(jobs["sku_encode_shard"]) == touched
    assert set(jobs) == {"sku_manifest", "sku_encode_shard", "sku_build_index", "sku_check", "sku_evaluate",
                         "workflow_overview", "all"}

    run_snakemake(sku_workdir, config)
    after = {p: p.stat().st_mtime_ns for p in shards_dir.rglob("*") if p.is_file()}
    changed = {p.parent.name for p in before if after[p] != before[p]}
    assert sorted(changed) == touched
    vectors, meta, _ = _index(sku_workdir)
    assert len(vectors) == (12 + 2) * 3 and {"new-a", "new-b"} <= set(meta["sku_id"])


def test_killed_run_resumes_to_the_same_index_whatever_the_shard_count(tmp_path, tiny_clip):
    runs = {}
    for name, shards in [("clean", 3), ("other_count", 2)]:
        workdir = tmp_path / name
        make_catalog(workdir / "data", 6)
        run_snakemake(workdir, workflow_config(workdir, tiny_clip, shards=shards))
        runs[name] = _index(workdir)
    # random weights (no checkpoint): every shard job must still build the same model
    random_weights = {"name": tiny_clip["name"], "config_file": tiny_clip["config_file"], "pretrained": None}
    for name, shards in [("random_3", 3), ("random_1", 1)]:
        workdir = tmp_path / name
        make_catalog(workdir / "data", 6)
        run_snakemake(workdir, workflow_config(workdir, tiny_clip, shards=shards, model=random_weights))
        runs[name] = _index(workdir)
    np.testing.assert_array_equal(runs["random_3"][0], runs["random_1"][0])

    workdir = tmp_path / "killed"
    make_catalog(workdir / "data", 6)
    config = workflow_config(workdir, tiny_clip, shards=3)
    first_shard = workdir / "results" / "sku_index" / "shards" / "000-of-003" / "stats.json"
    kill_mid_run(workdir, config, first_shard.exists)  # the whole job tree, mid-run, no cleanup
    assert not (workdir / "results" / "sku_index" / "index.faiss").exists()
    run_snakemake(workdir, config)
    runs["killed"] = _index(workdir)

    clean_vectors, clean_meta, _ = runs["clean"]
    for name in ["killed", "other_count"]:
        vectors, meta, _ = runs[name]
        np.testing.assert_array_equal(vectors, clean_vectors, err_msg=name)
        pd.testing.assert_frame_equal(meta, clean_meta, obj=name)


@pytest.mark.parametrize("pipeline, prefix", [("sku_index", "sku_"), ("video_frames", "video_"),
                                              ("speaker_embed", "speaker_"), ("kline_factor", "kline_"),
                                              ("probe_qa", "probe_")])
def test_each_pipeline_runs_alone_through_the_target_rule_of_its_name(tmp_path, pipeline, prefix):
    (tmp_path / "resources").symlink_to(REPO / "resources")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    proc = run_snakemake(tmp_path, config, "-n", pipeline)
    rules = {line.split()[1].rstrip(":") for line in proc.stdout.splitlines()
             if line.strip().startswith(("rule ", "localrule "))}
    assert pipeline in rules and all(r == pipeline or r.startswith(prefix) for r in rules), rules
