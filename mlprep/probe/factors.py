"""A factor shard: for each failure of one probe shard, the LLM completes the factor template ("which visual
factor explains this error", one of `factors.vocabulary`, with an explanation), then verifies that completion
(as the seed's steps do). Both answers are JSON checked against a schema (mlprep.probe.prompts).

All completions of the shard are in flight together, then all verifications; the response cache makes a
rerun after a kill resend nothing already answered. `factors.parquet` holds every failure once, whatever
happened: `factor_status` is verified, rejected (the verification said no), failed (a request failed for
good; its failure record says why) or skipped (`factors.enabled: false`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

import pandas as pd

from mlprep.failures import FailureLog, write_failures
from mlprep.io import atomic_dir, write_parquet
from mlprep.llm import ask_all, schema_check
from mlprep.probe import prompts
from mlprep.probe.probe import SHARD_FILES as PROBE_FILES
from mlprep.probe.probe import llm_settings
from mlprep.probe.reader import data_uri, group_images
from mlprep.probe.zero_shot import PROBE_COLUMNS
from mlprep.sources import join
from mlprep.stats import ShardStats, scheduler_ids

log = logging.getLogger(__name__)

FACTOR_COLUMNS = [*PROBE_COLUMNS, "factor", "explanation", "verified", "verify_reason", "factor_status",
                  "attempts", "model", "backend", "prompt_hash"]
SHARD_FILES = {"factors": "factors.parquet", "failures": "failures.parquet", "stats": "stats.json"}


def _with_images(cases: pd.DataFrame, cfg: dict, failures: FailureLog, send: bool):
    """(position, data URI or None) per case, in row group order, each group's images read once."""
    if not send:
        yield from ((k, None) for k in cases.index)
        return
    for k, data in group_images(cfg["data_dir"], cases, cfg["image_column"], cfg.get("images_dir"), failures,
                                cfg.get("object_storage")):
        yield k, data_uri(data)


def factor_shard(shard_text: str, probe_dir: Path | str, cfg: dict, continue_on_error: bool, out_dir: Path | str,
                 cache_path: Path | str, progress: TextIO | None = None) -> dict:
    stats = ShardStats(shard_text)
    table = pd.read_parquet(Path(probe_dir) / PROBE_FILES["probe"])
    cases = table[~table["correct"].astype(bool)].reset_index(drop=True)
    fcfg = cfg["factors"]
    settings = llm_settings(cfg)
    out = cases.assign(factor=None, explanation=None, verified=None, verify_reason=None, factor_status="skipped",
                       attempts=0, model=settings.model, backend=settings.backend,
                       prompt_hash=prompts.prompt_hash(fcfg["prompt"], fcfg["verify_prompt"]))
    out = out.astype({"factor": object, "explanation": object, "verified": object, "verify_reason": object})
    failures = FailureLog(continue_on_error)
    summary = {}
    if fcfg["enabled"] and len(cases):
        prompts.check_template("factors.prompt", fcfg["prompt"])
        prompts.check_template("factors.verify_prompt", fcfg["verify_prompt"])
        vocabulary = [str(v) for v in fcfg["vocabulary"]]
        images: dict[int, str | None] = {}

        def completion_requests():
            for k, uri in _with_images(cases, cfg, failures, bool(fcfg["send_images"])):
                images[k] = uri
                row = cases.loc[k]
                text = fcfg["prompt"].format(label=row["label"], prediction=row["prediction"],
                                             score=float(row["score"]), factors=", ".join(vocabulary))
                yield k, prompts.messages(text, prompts.factor_schema(vocabulary), uri)

        def failed(step):
            def record(k, err):
                out.loc[k, "factor_status"] = "failed"
                failures.record(cases.at[k, "item_id"], join(cfg["data_dir"], cases.at[k, "file"]), step,
                                prompts.llm_failure_code(err), str(err), cases.at[k, "id"])
            return record

        def completed(k, reply):
            out.at[k, "factor"] = reply.parsed["factor"]
            out.at[k, "explanation"] = reply.parsed["explanation"]
            out.at[k, "attempts"] += reply.attempts

        summary["complete"] = ask_all(settings, cache_path, completion_requests(),
                                      schema_check(prompts.factor_schema(vocabulary)), completed, failed("factor"),
                                      progress, len(cases), "factor")

        def verify_requests():
            for k in out.index[out["factor"].notna()]:
                row = out.loc[k]
                text = fcfg["verify_prompt"].format(label=row["label"], prediction=row["prediction"],
                                                    score=float(row["score"]), factor=row["factor"],
                                                    explanation=row["explanation"])
                yield k, prompts.messages(text, prompts.VERIFY_SCHEMA, images.get(k))

        def verified(k, reply):
            out.at[k, "verified"] = bool(reply.parsed["verified"])
            out.at[k, "verify_reason"] = reply.parsed["reason"]
            out.at[k, "factor_status"] = "verified" if reply.parsed["verified"] else "rejected"
            out.at[k, "attempts"] += reply.attempts

        summary["verify"] = ask_all(settings, cache_path, verify_requests(), schema_check(prompts.VERIFY_SCHEMA),
                                    verified, failed("verify"), progress, int(out["factor"].notna().sum()), "verify")
        # a case whose image could not be read again got no request: it is failed, with its image failure
        unread = ~out.index.isin(list(images)) & (out["factor_status"] == "skipped")
        out.loc[unread, "factor_status"] = "failed"
    stats.ok = int((out["factor_status"] != "failed").sum())
    stats.failed = int((out["factor_status"] == "failed").sum())
    stats.counts = {"failures": len(cases), **{f"status_{k}": int(v) for k, v in
                                               out["factor_status"].value_counts().items()}}
    stats.extra = {"llm": summary, **scheduler_ids()}
    with atomic_dir(out_dir) as folder:
        write_parquet(out[FACTOR_COLUMNS], folder / SHARD_FILES["factors"], "probe.factors")
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("factors %s: %s", shard_text, data)
    return data
