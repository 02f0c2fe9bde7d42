"""Loud failures, unambiguous ids, reason codes, catalog checks, config errors (sku_index and video_frames)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, run_snakemake, workflow_config
from mlprep.config import ConfigError, check_config, load_schema, validate
from mlprep.failures import REASON_CODES, TooManyFailuresError, check_failed_share, failures_frame, Failure
from mlprep.sku.catalog import item_id_for, read_catalog
from mlprep.sku.checks import confusable_pairs, duplicate_images
from mlprep.video.pairs import read_pairs

SCHEMA = REPO / "config" / "schema.yaml"


# ---------------------------------------------------------------- ids


def test_sku_item_ids_cannot_be_forged(tmp_path):
    images = tmp_path / "img"
    (images / "B").mkdir(parents=True)
    (images / "c.jpg").write_bytes(b"one image")
    (images / "B" / "c.jpg").write_bytes(b"another image")
    data = [
        {"sku_id": "A/B", "images": ["c.jpg"]},
        {"sku_id": "A", "images": ["B/c.jpg", "./B/c.jpg", "B/../B/c.jpg"]},  # one file written three ways
        {"sku_id": "A%2FB", "images": ["c.jpg"]},
    ]
    (tmp_path / "s.json").write_text(json.dumps(data))
    catalog = read_catalog(tmp_path / "s.json", images, 4)
    assert catalog.failures == []
    ids = {i.item_id: (i.sku_id, i.image) for i in catalog.items}
    assert ids == {"A%2FB/c.jpg": ("A/B", "c.jpg"), "A/B/c.jpg": ("A", "B/c.jpg"), "A%252FB/c.jpg": ("A%2FB", "c.jpg")}
    assert item_id_for("sku0001", "x/y.jpg") == "sku0001/x/y.jpg"  # plain ids read as before
    assert catalog.items_frame().set_index("item_id")["listed"].to_dict() == {
        "A%2FB/c.jpg": 0, "A/B/c.jpg": 1, "A%252FB/c.jpg": 2}


def test_video_ids_are_unique_or_flagged(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ["a/b.mp4", "c.mp4", "x.mp4", "x.mkv"]:
        (tmp_path / name).write_bytes(b"x")
    data = [
        {"clip": "a/b.mp4", "text": "id derived from the path: a/b"},
        {"id": "a/b", "clip": "c.mp4", "text": "explicit id equal to a derived one"},
        {"clip": "x.mp4", "text": "derived id x"},
        {"clip": "x.mkv", "text": "derived id x again, another file"},
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    catalog = read_pairs(tmp_path / "p.json", tmp_path, {"train": 1})
    assert sorted(i.clip_id for i in catalog.items) == ["a/b", "x"]
    assert {i.clip_id: Path(i.path).name for i in catalog.items} == {"a/b": "b.mp4", "x": "x.mp4"}
    flagged = {(f.item_id, f.reason_code): f.reason for f in catalog.failures}
    assert set(flagged) == {("a/b", "duplicate_id"), ("x", "duplicate_id")}
    assert "pair #0 (a/b.mp4)" in flagged[("a/b", "duplicate_id")]
    assert "pair #2 (x.mp4)" in flagged[("x", "duplicate_id")]


# ---------------------------------------------------------------- reason codes


def test_catalog_failures_carry_reason_codes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.jpg").write_bytes(b"x")
    data = [
        {"sku_id": "A", "images": ["ok.jpg", "missing.jpg", "../up.jpg", "bad\x00name.jpg"]},
        {"sku_id": "A", "images": ["ok.jpg"]},
        {"sku_id": "B", "images": []},
        {"name": "no id", "images": ["ok.jpg"]},
        7,
    ]
    (tmp_path / "s.json").write_text(json.dumps(data))
    catalog = read_catalog(tmp_path / "s.json", tmp_path / "img", 2)
    codes = sorted((f.item_id, f.reason_code) for f in catalog.failures)
    assert codes == [("", "bad_record"), ("", "bad_record"), ("A", "duplicate_id"), ("A/../up.jpg", "unsafe_path"),
                     ("A/bad\x00name.jpg", "unsafe_path"), ("A/missing.jpg", "missing"), ("B", "no_images")]
    for text, code in [("{broken", "unreadable_list"), ("[]", "empty_list")]:
        (tmp_path / "s.json").write_text(text)
        assert [f.reason_code for f in read_catalog(tmp_path / "s.json", tmp_path / "img", 2).failures] == [code]
    assert all(f.reason_code in REASON_CODES for f in catalog.failures)


def test_pairs_failures_carry_reason_codes(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    data = [
        {"clip": "a.mp4", "text": "ok"},
        {"clip": "missing.mp4", "text": "x"},
        {"clip": "../../etc/passwd", "text": "x", "id": "evil"},
        {"clip": "a.mp4", "id": "w", "text": "x", "start": 3, "end": 1},
        {"clip": "a.mp4", "id": "t"},
        {"text": "no clip"},
    ]
    (tmp_path / "p.json").write_text(json.dumps(data))
    codes = {f.item_id: f.reason_code for f in read_pairs(tmp_path / "p.json", tmp_path, {"train": 1}).failures}
    assert codes == {"missing": "missing", "evil": "unsafe_path", "w": "bad_window", "t": "bad_record", "": "bad_record"}


# ---------------------------------------------------------------- the failed-share gate


def _failures(n: int, code: str = "missing") -> pd.DataFrame:
    return failures_frame([Failure(f"i{k}", f"/data/i{k}.jpg", "manifest", code, "image file not found")
                           for k in range(n)])


def test_failed_share_gate():
    result = check_failed_share("demo", 6, _failures(4), 0.5, "out/failures.parquet")
    assert result["items_ok"] == 6 and result["failed_share"] == 0.4 and result["failures_by_code"] == {"missing": 4}
    mixed = pd.concat([_failures(5), _failures(2, "not_an_image")], ignore_index=True)
    with pytest.raises(TooManyFailuresError) as caught:
        check_failed_share("demo", 3, mixed, 0.5, "out/failures.parquet")
    message = str(caught.value)
    assert "7 of 10 items failed (70.0%, more than max_failed_fraction 0.5)" in message
    assert "most common reason: missing (5 items), e.g. /data/i0.jpg: image file not found" in message
    assert "out/failures.parquet" in message
    assert check_failed_share("demo", 1, _failures(99), 1.0, "f")["failed_share"] == 0.99  # 1.0: share test off
    with pytest.raises(TooManyFailuresError, match="no item succeeded"):
        check_failed_share("demo", 0, _failures(1), 1.0, "f")
    with pytest.raises(TooManyFailuresError, match="produced nothing"):
        check_failed_share("demo", 0, _failures(0), 1.0, "f")


# ---------------------------------------------------------------- catalog checks


def _originals(rows):
    return pd.DataFrame(rows, columns=["item_id", "sku_id", "image", "content_hash", "listed"])


def test_duplicate_images_keep_the_first_listed():
    originals = _originals([
        ("..%2F..%2Fescape/sku0_0.jpg", "../../escape", "sku0_0.jpg", "h0", 5),
        ("sku0/sku0_0.jpg", "sku0", "sku0_0.jpg", "h0", 0),
        ("sku1/copy.jpg", "sku1", "copy.jpg", "h0", 3),
        ("sku0/sku0_1.jpg", "sku0", "sku0_1.jpg", "h1", 1),
        ("sku0/again.jpg", "sku0", "again.jpg", "h1", 2),  # same bytes within one SKU: not a catalog problem
        ("sku2/x.jpg", "sku2", "x.jpg", "h2", 4),
    ])
    checks = duplicate_images(originals, "drop")
    rows = checks[["check", "sku_a", "item_a", "sku_b", "item_b", "action"]].to_dict("records")
    assert rows == [
        {"check": "same_bytes", "sku_a": "sku0", "item_a": "sku0/sku0_0.jpg", "sku_b": "sku1", "item_b": "sku1/copy.jpg",
         "action": "dropped"},
        {"check": "same_file", "sku_a": "sku0", "item_a": "sku0/sku0_0.jpg", "sku_b": "../../escape",
         "item_b": "..%2F..%2Fescape/sku0_0.jpg", "action": "dropped"},
    ]
    assert duplicate_images(originals, "keep")["action"].unique().tolist() == ["kept"]
    assert len(duplicate_images(originals.iloc[3:], "keep")) == 0


def test_confusable_pairs_are_the_closest_different_skus():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 8))
    vectors = np.stack([base[0], base[0] + 0.05 * base[1], base[1], base[1] + 0.3 * base[2], base[2], base[3]])
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    originals = _originals([(f"{s}/{k}", s, f"{k}.jpg", f"h{k}", k)
                            for k, s in enumerate(["a", "b", "c", "d", "d", "e"])])
    pairs = confusable_pairs(vectors, originals, top=2, sample=100, seed=0)
    assert pairs[["sku_a", "sku_b"]].values.tolist() == [["a", "b"], ["c", "d"]]
    assert pairs["score"].iloc[0] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
    assert (pairs["check"] == "confusable").all() and pairs["score"].is_monotonic_decreasing
    sampled = confusable_pairs(vectors, originals, top=10, sample=3, seed=0)
    assert 0 < len(sampled) <= 10 and (sampled["sku_a"] != sampled["sku_b"]).all()
    assert len(confusable_pairs(vectors, originals, top=0, sample=100, seed=0)) == 0


# ---------------------------------------------------------------- config


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_unknown_key_message_is_short_and_lists_the_allowed_keys():
    config = _default_config()
    config["sku_index"]["shardz"] = 4
    with pytest.raises(ConfigError) as caught:
        validate(config, load_schema(SCHEMA))
    message = str(caught.value)
    assert len(message.splitlines()) == 2
    assert "unknown key 'shardz' in sku_index (allowed: augment, " in message and "did you mean 'shards'?" in message


def test_command_line_strings_are_read_as_the_schema_types():
    config = {"seed": "7", "sku_index": {"shards": "8", "eval": {"top_k": ["1", "3"]}, "model": {"pretrained": "null"}}}
    validate(config, load_schema(SCHEMA))
    assert config["seed"] == 7 and config["sku_index"]["shards"] == 8 and config["sku_index"]["eval"]["top_k"] == [1, 3]
    assert config["sku_index"]["model"]["pretrained"] is None
    with pytest.raises(ConfigError, match="sku_index.shards: 'eight' is not of type 'integer'"):
        validate({"sku_index": {"shards": "eight"}}, load_schema(SCHEMA))


def test_missing_inputs_are_named_by_key(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = _default_config()
    config["sku_index"]["images_dir"] = str(tmp_path / "nope")
    config["sku_index"]["model"]["pretrained"] = str(tmp_path / "w.pt")
    config["video_frames"]["pairs"] = str(tmp_path)  # a folder where a file belongs
    with pytest.raises(ConfigError) as caught:
        check_config(config, SCHEMA)
    lines = str(caught.value).splitlines()[1:]
    assert lines == [
        f"  sku_index.images_dir: folder '{tmp_path / 'nope'}' does not exist",
        f"  sku_index.model.pretrained: file '{tmp_path / 'w.pt'}' does not exist",
        f"  video_frames.pairs: file '{tmp_path}' is not a file",
    ]
    config = _default_config()
    config["sku_index"]["model"]["pretrained"] = "laion2b_s34b_b79k"  # a hub tag, not a path
    config["video_frames"] = {"enabled": False, "clips_dir": "nope"}  # disabled pipelines are not checked
    check_config(config, SCHEMA)


@pytest.mark.slow
def test_missing_input_folder_stops_the_run_before_any_job(sku_workdir, tiny_clip):
    config = workflow_config(sku_workdir, tiny_clip, images_dir=str(sku_workdir / "photos"))
    proc = run_snakemake(sku_workdir, config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"sku_index.images_dir: folder '{sku_workdir / 'photos'}' does not exist" in out
    assert "Traceback" not in out and "Building DAG" not in out and not (sku_workdir / "results").exists()
    config = workflow_config(sku_workdir, tiny_clip, shardz=3)
    proc = run_snakemake(sku_workdir, config, check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "profile" not in ln and "Config file" not in ln]
    assert proc.returncode != 0 and len(lines) <= 3, lines
    assert "unknown key 'shardz' in sku_index (allowed:" in "\n".join(lines)


# ---------------------------------------------------------------- workflow: loud failures and catalog checks


@pytest.mark.slow
def test_a_run_where_most_items_fail_fails(sku_workdir, tiny_clip):
    images = sku_workdir / "data" / "images"
    for path in sorted(images.glob("*.jpg"))[:7]:
        path.unlink()  # 7 of 12 photos gone
    config = workflow_config(sku_workdir, tiny_clip)
    proc = run_snakemake(sku_workdir, config, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "sku_index: 7 of 12 items failed (58.3%, more than max_failed_fraction 0.5)" in out
    assert "most common reason: missing (7 items), e.g. " in out and "image file not found" in out
    folder = sku_workdir / "results" / "sku_index"
    assert len(pd.read_parquet(folder / "failures.parquet")) == 7  # written before the run fails
    assert not (folder / "eval.json").exists()
    config["max_failed_fraction"] = 0.6
    run_snakemake(sku_workdir, config)
    check = json.loads((folder / "check.json").read_text())
    assert check["items_ok"] == 5 and check["items_failed"] == 7 and check["failures_by_code"] == {"missing": 7}


@pytest.mark.slow
def test_catalog_checks_find_reused_photos_and_duplicate_policy(sku_workdir, tiny_clip):
    data = sku_workdir / "data"
    skus = json.loads((data / "sku_data.json").read_text())
    (data / "images" / "B").mkdir()
    shutil.copy(data / "images" / "sku0001_0.jpg", data / "images" / "c.jpg")
    shutil.copy(data / "images" / "sku0002_0.jpg", data / "images" / "B" / "c.jpg")
    shutil.copy(data / "images" / "sku0003_1.jpg", data / "images" / "copy.jpg")
    skus += [
        {"sku_id": "../../escape", "images": ["sku0000_0.jpg"]},  # a hostile entry reusing SKU000's photo
        {"sku_id": "A/B", "images": ["c.jpg"]},
        {"sku_id": "A", "images": ["B/c.jpg"]},
        {"sku_id": "other", "images": ["copy.jpg"]},  # another file with the same bytes as sku0003_1.jpg
    ]
    (data / "sku_data.json").write_text(json.dumps(skus))
    config = workflow_config(sku_workdir, tiny_clip, confusable_pairs=5)
    run_snakemake(sku_workdir, config)
    folder = sku_workdir / "results" / "sku_index"
    meta = pd.read_parquet(folder / "metadata.parquet")
    assert {"A%2FB/c.jpg", "A/B/c.jpg", "..%2F..%2Fescape/sku0000_0.jpg"} <= set(meta["item_id"])
    checks = pd.read_parquet(folder / "catalog_checks.parquet")
    dups = checks[checks["check"] != "confusable"]
    by_b = dict(zip(dups["sku_b"], zip(dups["check"], dups["sku_a"], dups["action"])))
    assert by_b == {"../../escape": ("same_file", "sku0000", "kept"), "A/B": ("same_bytes", "sku0001", "kept"),
                    "A": ("same_bytes", "sku0002", "kept"), "other": ("same_bytes", "sku0003", "kept")}
    confusable = checks[checks["check"] == "confusable"]
    assert len(confusable) == 5 and (confusable["sku_a"] < confusable["sku_b"]).all()
    assert confusable["score"].is_monotonic_decreasing and (confusable["score"] < 1).all()
    page = (folder / "catalog_checks.html").read_text()
    assert "Same image under different SKUs (4)" in page and "../../escape" in page
    info = json.loads((folder / "index_info.json").read_text())
    assert info["catalog_checks"] == {"duplicate_images": 4, "confusable_pairs": 5, "confusable_search": "exhaustive"}

    run_snakemake(sku_workdir, {**config, "sku_index": {**config["sku_index"], "duplicate_images": "drop"}})
    meta = pd.read_parquet(folder / "metadata.parquet")
    assert not {"../../escape", "A/B", "A", "other"} & set(meta["sku_id"]) and meta["item_id"].nunique() == 12
    info = json.loads((folder / "index_info.json").read_text())
    assert info["n_dropped_duplicates"] == 4 and info["ntotal"] == 12 * 3
    assert json.loads((folder / "eval.json").read_text())["n_queries"] == 12  # dropped items ask no queries

    proc = run_snakemake(sku_workdir, {**config, "sku_index": {**config["sku_index"], "duplicate_images": "fail"}},
                         check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "4 images repeat an image of another SKU (duplicate_images: fail)" in out
    assert "sku0000_0.jpg of SKU '../../escape' = sku0000_0.jpg of SKU 'sku0000'" in out


# ---------------------------------------------------------------- search-sku on an empty index


def test_search_refuses_an_empty_index(tmp_path, capsys):
    import faiss

    from mlprep.cli import main
    from mlprep.io import write_json
    from mlprep.indexing import write_index

    write_index(faiss.IndexFlatIP(8), tmp_path / "index.faiss")
    write_json({"model": {}, "device": "cpu", "precision": "fp32", "seed": 0}, tmp_path / "index_info.json")
    assert main(["search-sku", "--index", str(tmp_path / "index.faiss"), str(tmp_path / "q.jpg")]) == 2
    err = capsys.readouterr().err
    assert "holds no vectors" in err and "failures.parquet" in err


# ---------------------------------------------------------------- empty splits


def test_a_split_without_usable_clips_is_warned_about(tmp_path):
    from mlprep.demo import write_clip
    from mlprep.video.extract import extract_shard
    from mlprep.failures import write_failures
    from mlprep.video.gather import gather
    from mlprep.video.pairs import shard_list_lines

    good = write_clip(tmp_path / "good.mp4", 1, 10, (64, 48))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    cfg = {"num_frames": 4, "width": 32, "height": 24, "backend": "pyav", "hwaccel": None, "timeout_s": 30}
    prefixes = []
    for split, path in [("train", good), ("val", tmp_path / "broken.mp4")]:
        prefix = tmp_path / "out" / split / "000-of-001"
        row = pd.DataFrame({"clip_id": [path.stem], "clip": [path.name], "path": [str(path)], "start": [None],
                            "end": [None], "text": ["t"], "size": [path.stat().st_size], "member": [""],
                            "offset": [-1], "group": [-1], "stamp": ["0"]})
        list_path = tmp_path / "lists" / f"{split}.jsonl"
        list_path.parent.mkdir(exist_ok=True)
        list_path.write_text("\n".join(shard_list_lines(row)) + "\n")
        outputs = {"pkl": f"{prefix}.pkl", "index": f"{prefix}.index.parquet"}
        extract_shard(f"{split}/000-of-001", list_path, cfg, True, 1, outputs)
        prefixes.append((split, str(prefix)))
    write_failures([], tmp_path / "manifest_failures.parquet")
    outputs = {k: str(tmp_path / "out" / name) for k, name in
               [("summary", "summary.json"), ("index", "index.parquet"), ("failures", "failures.parquet"),
                ("sheet", "sheet.png")]}
    summary = gather(prefixes, tmp_path / "manifest_failures.parquet", 2, outputs)
    assert summary["warnings"] == ["split 'val' has no usable clip (1 failed in its shards)"]
    assert summary["failures_by_code"] == {"not_a_video": 1}
    assert json.loads(Path(outputs["summary"]).read_text())["warnings"] == summary["warnings"]


def test_every_config_key_and_reason_code_is_documented():
    docs = (REPO / "config" / "README.md").read_text()

    def leaves(props: dict, prefix: str = ""):
        for name, sub in props.items():
            if "properties" in sub:
                yield from leaves(sub["properties"], f"{prefix}{name}.")
            else:
                yield prefix, name

    missing = [f"{prefix}{name}" for prefix, name in leaves(load_schema(SCHEMA)["properties"])
               if f"`{prefix}{name}`" not in docs and f"`{name}`" not in docs
               and f"`{prefix.split('.')[-2] if prefix else ''}.{name}" not in docs]
    assert missing == []
    assert [code for code in REASON_CODES if f"| `{code}` |" not in docs] == []
