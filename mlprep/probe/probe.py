"""A probe shard: every image of the shard's row groups through the probe model -> prediction, score, correct.

`clip_zero_shot` (the default, offline) encodes the images in batches against the label prompts
(mlprep.probe.zero_shot); `openai` asks an OpenAI-compatible vision endpoint to pick one label per image,
all requests of the shard in flight together through mlprep.llm (its cache makes a rerun after a kill
resend nothing already answered). Either way the shard reads one row group at a time and writes
`probe.parquet` (PROBE_COLUMNS), `failures.parquet` and `stats.json`, whole or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pandas as pd

from mlprep.failures import FailureLog, ItemError, write_failures
from mlprep.io import atomic_dir, write_parquet
from mlprep.llm import LLMSettings, ask_all, schema_check
from mlprep.probe import prompts
from mlprep.probe.catalog import LIST_COLUMNS, read_labels
from mlprep.probe.reader import data_uri, image_bytes, iter_row_groups, row_id
from mlprep.probe.zero_shot import PROBE_COLUMNS, ZeroShot, probe_frame, probe_rows
from mlprep.sharding import ShardId
from mlprep.shardlists import ShardLists
from mlprep.stats import ShardStats, scheduler_ids

log = logging.getLogger(__name__)

SHARD_FILES = {"probe": "probe.parquet", "failures": "failures.parquet", "stats": "stats.json"}


def llm_settings(cfg: dict, model: str | None = None) -> LLMSettings:
    """The shared `llm` block, with another model name where a step names one (the template backend's model
    is called "template": no record made offline names a real model)."""
    settings = dict(cfg["llm"])
    if model:
        settings["model"] = model
    if settings.get("backend") == "template":
        settings["model"] = "template"
    return LLMSettings.from_config(settings)


def _llm_probe_requests(root: Path, groups: pd.DataFrame, cfg: dict, labels: list[str], failures: FailureLog,
                        pending: dict) -> Iterator[tuple]:
    """One request per image, produced row group by row group as the client takes them."""
    index = set(labels)
    text = cfg["probe"]["prompt"].format(labels=", ".join(labels))
    schema = prompts.probe_schema(labels)
    image_column, label_column = cfg["image_column"], cfg["label_column"]
    first_rows = dict(zip(zip(groups["file"], groups["row_group"]), groups["first_row"]))
    for file, group, frame in iter_row_groups(root, groups, [image_column, label_column], failures):
        first = int(first_rows[(file, group)])
        for row, (cell, label) in enumerate(zip(frame[image_column], frame[label_column])):
            try:
                if str(label) not in index:
                    raise ItemError("bad_record", f"label {label!r} is not in the label set")
                uri = data_uri(image_bytes(cell, cfg.get("images_dir")))
            except ItemError as err:
                failures.record(row_id(file, first + row), str(root / file), "probe", err.code, str(err))
                continue
            tag = (file, group, first, row)
            pending[tag] = str(label)
            yield tag, prompts.messages(text, schema, uri)


def llm_probe(root: Path, groups: pd.DataFrame, cfg: dict, labels: list[str], failures: FailureLog,
              cache_path: Path | str, progress: TextIO | None) -> tuple[pd.DataFrame, dict]:
    """PROBE_COLUMNS for the shard's images, asked of the `llm` endpoint (model `probe.llm_model`, if set)."""
    pending: dict = {}
    answers: dict = {}
    errors: list = []
    settings = llm_settings(cfg, cfg["probe"].get("llm_model"))
    summary = ask_all(settings, cache_path, _llm_probe_requests(root, groups, cfg, labels, failures, pending),
                      schema_check(prompts.probe_schema(labels)),
                      on_reply=lambda tag, reply: answers.__setitem__(tag, reply.parsed),
                      on_error=lambda tag, err: errors.append((tag, err)), progress=progress,
                      total=int(groups["rows"].sum()), desc="probe")
    for (file, group, first, row), err in sorted(errors, key=lambda e: e[0]):
        failures.record(row_id(file, first + row), str(root / file), "probe", prompts.llm_failure_code(err),
                        str(err))
    parts = []
    for (file, group, first), tags in _by_group(sorted(answers)):
        rows = [t[3] for t in tags]
        parts.append(probe_frame(file, group, first, rows, [pending[t] for t in tags],
                                 [answers[t]["label"] for t in tags],
                                 [float(answers[t]["confidence"]) for t in tags]))
    return (pd.concat(parts, ignore_index=True) if parts else empty_probe()), summary


def _by_group(tags: list[tuple]) -> Iterator[tuple[tuple, list[tuple]]]:
    current, members = None, []
    for tag in tags:
        if tag[:3] != current:
            if members:
                yield current, members
            current, members = tag[:3], []
        members.append(tag)
    if members:
        yield current, members


def empty_probe() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
        PROBE_COLUMNS, ["str", "str", "int64", "int64", "int64", "str", "str", "float64", "bool"])})


def probe_shard(shard_text: str, list_path: Path | str, labels_path: Path | str, cfg: dict, continue_on_error: bool,
                out_dir: Path | str, cache_path: Path | str, progress: TextIO | None = None, seed: int = 0,
                device_spec: str = "cpu", precision_spec: str = "fp32", threads: int = 1) -> dict:
    """Probe one shard's row groups; the folder is written whole or not at all."""
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    groups = pd.DataFrame(ShardLists.read(list_path, LIST_COLUMNS), columns=LIST_COLUMNS)
    labels = read_labels(labels_path)
    root = Path(cfg["data_dir"])
    failures = FailureLog(continue_on_error)
    backend = cfg["probe"]["backend"]
    llm_summary = None
    if backend == "clip_zero_shot":
        from mlprep.encoders import load_clip_encoder

        encoder = load_clip_encoder(cfg["probe"]["model"], int(cfg["probe"]["batch_size"]), device_spec,
                                    precision_spec, threads, seed)
        probe = ZeroShot(encoder, labels, cfg["probe"]["prompt_template"])
        parts = []
        from tqdm import tqdm

        with tqdm(total=int(groups["rows"].sum()), desc="probe", unit="img", file=progress, mininterval=2.0) as bar:
            for part in probe_rows(root, groups, probe, failures, cfg["image_column"], cfg["label_column"],
                                   cfg.get("images_dir"), int(cfg["probe"]["batch_size"])):
                parts.append(part)
                bar.update(len(part))
                stats.first_item_done()
        table = pd.concat(parts, ignore_index=True) if parts else empty_probe()
    elif backend == "openai":
        prompts.check_template("probe.prompt", cfg["probe"]["prompt"])
        table, llm_summary = llm_probe(root, groups, cfg, labels, failures, cache_path, progress)
    else:
        raise ValueError(f"probe_qa.probe.backend: unknown backend {backend!r}")
    table = table.sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    stats.ok, stats.failed = len(table), len(failures)
    stats.counts = {"correct": int(table["correct"].sum()), "row_groups": len(groups)}
    stats.extra = {"backend": backend, "labels": len(labels), "llm": llm_summary, **scheduler_ids()}
    with atomic_dir(out_dir) as folder:
        write_parquet(table[PROBE_COLUMNS], folder / SHARD_FILES["probe"])
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data

