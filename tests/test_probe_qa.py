"""probe_qa through the real workflow: probe shards, failure factors, the failure-key sample, QA shards and the
summary, offline (template backend) and against the local OpenAI-compatible server (tests/llm_server.py) with
throttling, errors, timeouts, bad bodies and bad answers, and killed mid-run."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kill_mid_run, run_snakemake
from mlprep.config import only
from mlprep.demo import probe_image

LABELS = ["red circle", "green square", "blue triangle"]


def _images(n: int, seed: int) -> tuple[list[bytes], list[str]]:
    labels = [LABELS[(seed + k) % 3] for k in range(n)]
    return [probe_image(label, seed * 100 + k, size=32) for k, label in enumerate(labels)], labels


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the start of one row group's image pages: its footer stays readable, the group does not."""
    raw = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(group).column(0).data_page_offset
    raw[start + 10 : start + 60] = b"\xff" * 50
    path.write_bytes(bytes(raw))


def make_dataset(folder: Path, hostile: bool = True) -> dict:
    """a.parquet (bytes, 12 rows); with `hostile`: b.parquet ({bytes, path} structs, one image by path under
    images_dir, one path leaving it), c.parquet (a broken image, a label outside the set, a corrupt second row
    group) and d.parquet (not parquet). Returns the expected per-row failures by item id."""
    data, images_dir = folder / "data", folder / "images"
    data.mkdir(parents=True)
    images_dir.mkdir()
    cells, labels = _images(12, 0)
    pq.write_table(pa.table({"image": cells, "label": labels}), data / "a.parquet", row_group_size=4)
    if not hostile:
        return {}
    cells, labels = _images(8, 1)
    (images_dir / "x.png").write_bytes(cells[2])
    structs = [{"bytes": c, "path": None} for c in cells]
    structs[2] = {"bytes": None, "path": "x.png"}
    structs[5] = {"bytes": None, "path": "../a.png"}
    pq.write_table(pa.table({"image": structs, "label": labels}), data / "b.parquet", row_group_size=4)
    cells, labels = _images(8, 2)
    cells[1] = cells[1][:30]
    labels[2] = "purple star"
    pq.write_table(pa.table({"image": cells, "label": labels}), data / "c.parquet", row_group_size=4)
    corrupt_row_group(data / "c.parquet", 1)
    (data / "d.parquet").write_bytes(b"PAR1 not a parquet file")
    return {"b.parquet:5": "unsafe_path", "c.parquet:1": "not_an_image", "c.parquet:2": "bad_record",
            "c.parquet#1": "bad_row_group", "d.parquet": "unreadable_table"}


def probe_config(workdir: Path, tiny_clip: dict, llm: dict | None = None, **sections) -> dict:
    cfg = {
        "data_dir": str(workdir / "data"), "images_dir": str(workdir / "images"), "labels": LABELS, "shards": 2,
        "probe": {"backend": "clip_zero_shot", "model": tiny_clip, "batch_size": 8},
        "sampler": {"per_key": 2}, "qa": {"shards": 2, "qa_per_item": 2},
        "llm": {"backend": "template", **(llm or {})},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return {"device": "cpu", "precision": "fp32", "seed": 7, "continue_on_error": True,
            **only("probe_qa"), "probe_qa": cfg}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_llm(server, **extra) -> dict:
    return {"backend": "openai", "base_url": server.base_url, "api_key_env": None, "concurrency": 8,
            "timeout_s": 0.5, "max_retries": 10, "backoff_s": 0.01, "backoff_max_s": 0.05, **extra}


def test_offline_run_records_every_row_once_and_writes_qa_with_lineage(tmp_path, tiny_clip):
    expected_failures = make_dataset(tmp_path)
    config = probe_config(tmp_path, tiny_clip)
    run_snakemake(tmp_path, config)
    out = tmp_path / "results" / "probe_qa"
    probe = pd.read_parquet(out / "probe.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    assert dict(zip(failures["item_id"], failures["reason_code"])) == expected_failures
    readable = [f"a.parquet:{r}" for r in range(12)] + [f"b.parquet:{r}" for r in range(8)] + [
        f"c.parquet:{r}" for r in range(4)]
    assert sorted(probe["item_id"].tolist() + [i for i in failures["item_id"] if ":" in i]) == sorted(readable)
    assert probe["prediction"].isin(LABELS).all() and (probe["correct"] == (probe["label"] == probe["prediction"])).all()

    cases = pd.read_parquet(out / "failure_cases.parquet")
    assert cases["item_id"].tolist() == probe.loc[~probe["correct"], "item_id"].tolist()
    assert (cases["factor_status"] == "verified").all() and (cases["backend"] == "template").all()
    assert cases["explanation"].str.startswith("[template").all()

    samples = read_jsonl(out / "samples.jsonl")
    pairs = (cases["label"] + " -> " + cases["prediction"]).value_counts()
    by_key = pd.Series([s["key"] for s in samples]).value_counts()
    assert by_key.to_dict() == {k: min(2, n) for k, n in pairs.items()}  # stratified: all of a small key
    assert all(s["key_failures"] == pairs[s["key"]] for s in samples)
    assert all(s["image"] == {"file": s["source"]["file"], "row": s["source"]["row"]} for s in samples)

    qa = read_jsonl(out / "qa.jsonl")
    assert read_jsonl(out / "qa_failures.jsonl") == []
    assert sorted((r["item_id"], r["k"]) for r in qa) == sorted((s["item_id"], k) for s in samples for k in (0, 1))
    for record in qa:
        assert {"source", "failure_key", "model", "prompt_hash", "seed", "attempts", "question", "answer"} <= set(record)
        assert record["backend"] == "template" and record["model"] == "template" and record["seed"] == 7
        assert record["question"].startswith("[template")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["probe"]["images"] == len(probe) and summary["steps"]["qa"]["records"] == len(qa)
    assert summary["steps"]["sampler"]["sampled"] == len(samples)
    assert sum(c["count"] for c in summary["top_confusions"]) == len(cases)
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # images embedded on demand: the original bytes of each sampled cell; the QA answers come from the cache
    config["probe_qa"]["sampler"]["embed_images"] = True
    run_snakemake(tmp_path, config)
    embedded = read_jsonl(out / "samples.jsonl")
    assert [s["item_id"] for s in embedded] == [s["item_id"] for s in samples]
    for sample in embedded:
        source = sample["source"]
        cell = pq.ParquetFile(tmp_path / "data" / source["file"]).read_row_group(source["row_group"]).column(
            "image")[source["group_row"]].as_py()
        stored = cell["bytes"] if isinstance(cell, dict) else cell
        if stored is None:
            stored = (tmp_path / "images" / cell["path"]).read_bytes()
        assert base64.b64decode(sample["image"]["base64"]) == stored
    assert read_jsonl(out / "qa.jsonl") == qa

    strict = tmp_path / "strict"
    strict.mkdir()
    (strict / "data").symlink_to(tmp_path / "data")
    (strict / "images").symlink_to(tmp_path / "images")
    proc = run_snakemake(strict, {**probe_config(strict, tiny_clip), "continue_on_error": False}, check=False)
    assert proc.returncode != 0
    assert any(f"data/{name}.parquet" in proc.stderr + proc.stdout for name in "bcd")  # the first bad file met


def test_every_record_once_through_throttling_errors_timeouts_and_bad_bodies(tmp_path, tiny_clip, server_factory):
    make_dataset(tmp_path, hostile=False)
    server = server_factory("--rate-429", "0.1", "--rate-500", "0.1", "--rate-timeout", "0.05",
                            "--rate-malformed", "0.05", "--hang-s", "2", "--seed", "3")
    config = probe_config(tmp_path, tiny_clip, server_llm(server), probe={"backend": "openai"},
                          sampler={"per_key": 3}, qa={"qa_per_item": 3})
    run_snakemake(tmp_path, config)
    out = tmp_path / "results" / "probe_qa"
    probe = pd.read_parquet(out / "probe.parquet")
    assert sorted(probe["item_id"]) == sorted(f"a.parquet:{r}" for r in range(12))  # the LLM probed every image
    assert len(pd.read_parquet(out / "failures.parquet")) == 0
    cases = pd.read_parquet(out / "failure_cases.parquet")
    assert len(cases) and (cases["factor_status"] == "verified").all() and (cases["attempts"] >= 2).all()
    samples = read_jsonl(out / "samples.jsonl")
    qa, failed = read_jsonl(out / "qa.jsonl"), read_jsonl(out / "qa_failures.jsonl")
    assert failed == []
    assert sorted((r["item_id"], r["k"]) for r in qa) == sorted((s["item_id"], k) for s in samples for k in range(3))
    assert any(r["attempts"] > 1 for r in qa) and all(r["backend"] == "openai" for r in qa)
    stats = server.stats()
    assert set(stats["by_outcome"]) == {"ok", "429", "500", "timeout", "malformed"}
    # one answered request per image, per factor completion and verification, per (item, k): nothing twice
    assert stats["by_outcome"]["ok"] == stats["distinct"] == 12 + 2 * len(cases) + 3 * len(samples)
    assert stats["images"] == stats["requests"]


def test_killed_qa_step_resumes_without_resending_and_writes_each_pair_once(tmp_path, tiny_clip, server_factory):
    make_dataset(tmp_path, hostile=False)
    server = server_factory("--latency", "0.25")
    config = probe_config(tmp_path, tiny_clip, server_llm(server, concurrency=2), factors={"enabled": False},
                          sampler={"per_key": 12}, qa={"qa_per_item": 4, "shards": 1})
    run_snakemake(tmp_path, config, "probe_sample")
    samples = read_jsonl(tmp_path / "results" / "probe_qa" / "samples.jsonl")
    assert server.stats()["requests"] == 0 and len(samples) >= 4
    kill_mid_run(tmp_path, config, lambda: server.stats()["requests"] >= 8)
    sent = server.stats()["requests"]
    assert 8 <= sent < 4 * len(samples)
    with sqlite3.connect(tmp_path / "results" / "probe_qa" / "llm_cache" / "qa_000-of-001.sqlite") as db:
        answered = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert answered >= 6  # answers were kept as they arrived
    run_snakemake(tmp_path, config)
    stats = server.stats()
    # the rerun sent exactly the requests that had no answer yet (those in flight at the kill among them)
    assert stats["requests"] - sent == 4 * len(samples) - answered and stats["distinct"] == 4 * len(samples)
    qa = read_jsonl(tmp_path / "results" / "probe_qa" / "qa.jsonl")
    assert sorted((r["item_id"], r["k"]) for r in qa) == sorted((s["item_id"], k) for s in samples for k in range(4))


def test_bad_model_answers_are_retried_then_recorded_with_their_reason(tmp_path, tiny_clip, server_factory):
    make_dataset(tmp_path, hostile=False)
    server = server_factory("--rate-bad-output", "0.5", "--rate-bad-fields", "0.5")
    config = probe_config(tmp_path, tiny_clip, server_llm(server, max_retries=2), sampler={"per_key": 1})
    run_snakemake(tmp_path, config)
    out = tmp_path / "results" / "probe_qa"
    cases = pd.read_parquet(out / "failure_cases.parquet")
    failures = pd.read_parquet(out / "failures.parquet")
    assert len(cases) and (cases["factor_status"] == "failed").all()
    assert sorted(failures["item_id"]) == sorted(cases["item_id"]) and (failures["stage"] == "factor").all()
    assert (failures["reason_code"] == "llm_bad_output").all() and failures["reason"].str.contains(
        "after 3 attempts").all()
    reasons = " ".join(failures["reason"])
    assert "not JSON" in reasons and "is a required property" in reasons
    samples = read_jsonl(out / "samples.jsonl")
    failed = read_jsonl(out / "qa_failures.jsonl")
    assert read_jsonl(out / "qa.jsonl") == []
    assert sorted((r["item_id"], r["k"]) for r in failed) == sorted((s["item_id"], k) for s in samples for k in (0, 1))
    assert all(r["reason_code"] == "llm_bad_output" and r["attempts"] == 3 for r in failed)
    assert server.stats()["requests"] == 3 * (len(cases) + 2 * len(samples))


def test_prompt_templates_and_answer_schemas_name_what_is_wrong():
    from mlprep.llm import ask_json, schema_check, template_answer
    from mlprep.probe import prompts

    with pytest.raises(ValueError, match=r"probe_qa.qa.prompt: unknown field\(s\) \{colour\}"):
        prompts.check_template("qa.prompt", "Ask about {label} and {colour}")
    prompts.check_template("factors.prompt", "{label} vs {prediction} ({score:.2f}): one of {factors}")
    check = schema_check(prompts.factor_schema(["blur", "other"]))
    assert check('```json\n{"factor": "blur", "explanation": "soft edges"}\n```')["factor"] == "blur"
    for text, message in [("no", "not JSON"), ('{"factor": "blur"}', "'explanation' is a required property"),
                          ('{"factor": "glare", "explanation": "x"}', "factor: 'glare' is not one of")]:
        with pytest.raises(ValueError, match=message):
            check(text)
    answer = template_answer(prompts.messages(ask_json("q", prompts.QA_SCHEMA), prompts.QA_SCHEMA, None), "ab" * 32)
    assert schema_check(prompts.QA_SCHEMA)(answer)["question"].startswith("[template abababab]")


def test_datasets_as_users_hold_them_empty_files_missing_columns_own_ids_null_cells(tmp_path, tiny_clip):
    """Found on real data: a file of no rows and a file whose only row group holds no decodable image, both sorting
    first in their shard, crashed the factor step; a file without the image column failed with a bare KeyError;
    the dataset's own ids were dropped; a null image cell was said to hold a float."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "images").mkdir()
    cells, labels = _images(6, 0)
    ids = [f"user-{k}" for k in range(6)]
    pq.write_table(pa.table({"id": ids, "image": cells, "label": labels}), data / "b_ok.parquet", row_group_size=3)
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                             "label": pa.array([], pa.string())}), data / "a0_empty.parquet")
    pq.write_table(pa.table({"id": ["x0", "x1"], "image": [b"not an image", b"nor this"], "label": labels[:2]}),
                   data / "a1_no_usable_image.parquet")
    pq.write_table(pa.table({"id": ["n0"], "picture": [cells[0]], "label": labels[:1]}), data / "c_no_image.parquet")
    pq.write_table(pa.table({"id": ["z0", None], "image": pa.array([cells[1], None], pa.binary()),
                             "label": labels[:2]}), data / "d_null_cell.parquet")
    # img2dataset's parquet: the image in `jpg`, its name in `key`, no `id` (image_column auto finds `jpg`)
    pq.write_table(pa.table({"key": ["000000", "000001"], "jpg": cells[2:4], "label": labels[2:4]}),
                   data / "e_img2dataset.parquet")
    config = probe_config(tmp_path, tiny_clip, shards=1, image_column="auto")
    run_snakemake(tmp_path, config)
    out = tmp_path / "results" / "probe_qa"
    failures = {r.item_id: (r.reason_code, r.reason) for r in pd.read_parquet(out / "failures.parquet").itertuples()}
    assert failures.pop("c_no_image.parquet")[0] == "missing_column"
    assert failures.pop("d_null_cell.parquet:1") == ("not_an_image", "the image cell is null")
    assert {k: v[0] for k, v in failures.items()} == {"a1_no_usable_image.parquet:0": "not_an_image",
                                                      "a1_no_usable_image.parquet:1": "not_an_image"}
    own_ids = dict(zip(*pd.read_parquet(out / "failures.parquet", columns=["item_id", "id"]).to_dict("list").values()))
    assert own_ids["a1_no_usable_image.parquet:1"] == "x1" and pd.isna(own_ids["d_null_cell.parquet:1"])
    probe = pd.read_parquet(out / "probe.parquet")
    assert sorted(probe["id"].dropna()) == sorted([*ids, "z0"])  # the dataset's own ids, beside mlprep's item ids
    assert probe["item_id"].str.startswith("e_img2dataset.parquet:").sum() == 2
    assert dict(zip(probe["item_id"], probe["id"]))["b_ok.parquet:4"] == "user-4"
    cases = pd.read_parquet(out / "failure_cases.parquet")
    assert cases["id"].tolist() == probe.loc[~probe["correct"], "id"].tolist()
    own = {k: None if pd.isna(v) else v for k, v in zip(probe["item_id"], probe["id"])}
    assert all(s["id"] == own[s["item_id"]] for s in read_jsonl(out / "samples.jsonl"))
    qa = read_jsonl(out / "qa.jsonl")
    assert qa and all(r["id"] == own[r["item_id"]] for r in qa)
    # the missing column, without continue_on_error: the run stops naming the file and the column
    config["continue_on_error"] = False
    (data / "a1_no_usable_image.parquet").unlink()
    (data / "d_null_cell.parquet").unlink()
    done = run_snakemake(tmp_path, config, "--forceall", check=False)
    assert done.returncode != 0
    assert "c_no_image.parquet" in done.stdout + done.stderr and "no image column" in done.stdout + done.stderr


def test_a_dataset_in_a_bucket_gives_the_probe_and_qa_of_the_folder(tmp_path, tiny_clip, s3_server):
    """The hostile dataset (structs, a bad row group, a file that is not parquet) from a folder and from a bucket of
    the real local S3 server: the same probe, failures and QA."""
    import shutil

    expected = make_dataset(tmp_path / "folder")
    shutil.copytree(tmp_path / "folder" / "data", s3_server.root / "bucket" / "probe")
    runs = {}
    for form, data_dir in (("folder", str(tmp_path / "folder" / "data")), ("bucket", "s3://bucket/probe")):
        work = tmp_path / form
        work.mkdir(exist_ok=True)
        config = probe_config(work, tiny_clip, data_dir=data_dir, images_dir=str(tmp_path / "folder" / "images"))
        config["object_storage"] = s3_server.storage
        run_snakemake(work, config)
        runs[form] = work / "results" / "probe_qa"
    for name in ("probe.parquet", "failure_cases.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(runs["bucket"] / name), pd.read_parquet(runs["folder"] / name))
    failures = pd.read_parquet(runs["bucket"] / "failures.parquet")
    assert dict(zip(failures["item_id"], failures["reason_code"])) == expected
    assert failures["path"].str.startswith("s3://bucket/probe/").all()
    assert read_jsonl(runs["bucket"] / "qa.jsonl") == read_jsonl(runs["folder"] / "qa.jsonl")
    summary = json.loads((runs["bucket"] / "summary.json").read_text())
    assert summary["dataset"]["data_dir"] == "s3://bucket/probe"
