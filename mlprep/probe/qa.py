"""A QA shard: `qa_per_item` question-answer pairs for each sampled failure of the shard's list, asked of the
LLM backend, one request per (item, k), all in flight together.

Every record carries its lineage: the source parquet file and row, the failure key, the model and backend,
the prompt's hash, the seed of the request (derived from the config seed, item and k, and sent as the
request's `seed`) and how many requests the answer took. A request that fails for good (after its retries)
is a line of `failures.jsonl` with the reason instead; so each (item, k) is in exactly one of the two files.
The response cache makes a rerun after a kill send only what had not been answered, and the shard's files
are written whole at the end: never a duplicate or a partial record.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import TextIO

import pandas as pd

from mlprep.failures import FailureLog
from mlprep.io import atomic_dir
from mlprep.llm import ask_all, schema_check
from mlprep.probe import prompts
from mlprep.probe.probe import llm_settings
from mlprep.probe.reader import data_uri, group_images
from mlprep.rng import derive_seed
from mlprep.stats import ShardStats, scheduler_ids

log = logging.getLogger(__name__)

SHARD_FILES = {"qa": "qa.jsonl", "failures": "failures.jsonl", "stats": "stats.json"}


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records),
                    encoding="utf-8")


def _image_uris(samples: list[dict], cfg: dict, failures: FailureLog, send: bool):
    """(position, data URI or None) per sample: embedded images as they are, the others read row group by
    row group (each group once), in that order."""
    refs = []
    for k, sample in enumerate(samples):
        image = sample.get("image") or {}
        if not send:
            yield k, None
        elif "base64" in image:
            yield k, data_uri(base64.b64decode(image["base64"]))
        else:
            source = sample["source"]
            refs.append((k, source["file"], source["row_group"], source["group_row"], source["row"]))
    if refs:
        frame = pd.DataFrame(refs, columns=["k", "file", "row_group", "group_row", "row"]).set_index("k")
        for k, data in group_images(cfg["data_dir"], frame, cfg["image_column"], cfg.get("images_dir"),
                                    failures, cfg.get("object_storage")):
            yield k, data_uri(data)


def qa_shard(shard_text: str, list_path: Path | str, cfg: dict, seed: int, continue_on_error: bool,
             out_dir: Path | str, cache_path: Path | str, progress: TextIO | None = None) -> dict:
    stats = ShardStats(shard_text)
    qcfg = cfg["qa"]
    prompts.check_template("qa.prompt", qcfg["prompt"])
    samples = read_jsonl(list_path)
    n = int(qcfg["qa_per_item"])
    settings = llm_settings(cfg)
    lineage = {"model": settings.model, "backend": settings.backend, "prompt_hash": prompts.prompt_hash(qcfg["prompt"]),
               "seed": int(seed)}
    failures = FailureLog(True)  # image failures: counted, and each of the item's (item, k) gets a failure line
    records, failed, asked = [], [], set()

    def requests():
        for k, uri in _image_uris(samples, cfg, failures, bool(qcfg["send_images"])):
            sample = samples[k]
            asked.add(k)
            for j in range(n):
                text = qcfg["prompt"].format(label=sample["label"], prediction=sample["prediction"],
                                             factor=sample.get("factor") or "unknown",
                                             explanation=sample.get("explanation") or "none given", k=j + 1, n=n)
                request_seed = derive_seed(seed, "qa", sample["item_id"], j) % 2**31
                yield (k, j, request_seed), prompts.messages(text, prompts.QA_SCHEMA, uri), {"seed": request_seed}

    def base(k: int, j: int, request_seed: int) -> dict:
        sample = samples[k]
        return {"qa_id": f"{sample['item_id']}#{j}", "item_id": sample["item_id"], "id": sample.get("id"), "k": j,
                "source": sample["source"], "failure_key": sample["key"], "label": sample["label"],
                "prediction": sample["prediction"], "factor": sample.get("factor"), **lineage,
                "request_seed": request_seed}

    def answered(tag, reply):
        records.append({**base(*tag), "question": reply.parsed["question"], "answer": reply.parsed["answer"],
                        "attempts": reply.attempts, "request_key": reply.key})

    def errored(tag, err):
        failed.append({**base(*tag), "reason_code": prompts.llm_failure_code(err), "reason": str(err),
                       "attempts": err.attempts})

    summary = ask_all(settings, cache_path, requests(), schema_check(prompts.QA_SCHEMA), answered, errored,
                      progress, len(samples) * n, "qa")
    image_failures = {f.item_id: f for f in failures.records}
    for k, sample in enumerate(samples):
        if k in asked:
            continue
        failure = image_failures.get(sample["item_id"])
        if not continue_on_error:
            raise RuntimeError(f"{sample['source']['file']}: the image of {sample['item_id']!r} cannot be read for "
                               f"its questions: {failure.reason if failure else 'unknown'}")
        for j in range(n):
            failed.append({**base(k, j, derive_seed(seed, "qa", sample["item_id"], j) % 2**31),
                           "reason_code": failure.reason_code if failure else "not_an_image",
                           "reason": failure.reason if failure else "the image could not be read", "attempts": 0})
    if failed and not continue_on_error:
        first = sorted(failed, key=lambda r: r["qa_id"])[0]
        raise RuntimeError(f"{first['source']['file']}: question {first['k']} of {first['item_id']!r} failed: "
                           f"{first['reason']} [{first['reason_code']}] (set continue_on_error: true to record "
                           "such items and go on)")
    records.sort(key=lambda r: (r["item_id"], r["k"]))
    failed.sort(key=lambda r: (r["item_id"], r["k"]))
    stats.ok, stats.failed = len(records), len(failed)
    stats.counts = {"samples": len(samples), "requests": len(samples) * n}
    stats.extra = {"llm": summary, **scheduler_ids()}
    with atomic_dir(out_dir) as folder:
        write_jsonl(records, folder / SHARD_FILES["qa"])
        write_jsonl(failed, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("qa %s: %s", shard_text, data)
    return data
