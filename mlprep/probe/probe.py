"""A probe shard: every image of the shard's row groups through the probe model -> prediction, score, correct.

`classifier` (the default, offline: an image classifier's own classes stand for the labels) and
`clip_zero_shot` (CLIP against the label prompts) run a local model over the images in batches
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
from mlprep.probe.catalog import LIST_COLUMNS, id_column, read_labels
from mlprep.probe.reader import data_uri, image_bytes, iter_row_groups, row_id
from mlprep.probe.zero_shot import (PROBE_COLUMNS, PROBE_DTYPES, Classifier, ZeroShot, dataset_id, probe_chunks,
                                    probe_rows, probe_table)
from mlprep.sharding import ShardId
from mlprep.sources import join
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


def _llm_probe_requests(root: str, groups: pd.DataFrame, cfg: dict, labels: list[str], failures: FailureLog,
                        pending: dict) -> Iterator[tuple]:
    """One request per image, produced row group by row group as the client takes them."""
    index = set(labels)
    text = cfg["probe"]["prompt"].format(labels=", ".join(labels))
    schema = prompts.probe_schema(labels)
    image_column, label_column, own = cfg["image_column"], cfg["label_column"], id_column(cfg)
    first_rows = dict(zip(zip(groups["file"], groups["row_group"]), groups["first_row"]))
    for file, group, frame in iter_row_groups(root, groups, [image_column, label_column], failures, (own,),
                                              cfg.get("object_storage")):
        first = int(first_rows[(file, group)])
        ids = frame[own] if own in frame else [None] * len(frame)
        for row, (cell, label, own_id) in enumerate(zip(frame[image_column], frame[label_column], ids)):
            try:
                if str(label) not in index:
                    raise ItemError("bad_record", f"label {label!r} is not in the label set")
                uri = data_uri(image_bytes(cell, cfg.get("images_dir")))
            except ItemError as err:
                failures.record(row_id(file, first + row), join(root, file), "probe", err.code, str(err),
                                dataset_id(own_id))
                continue
            tag = (file, group, first, row)
            pending[tag] = (str(label), dataset_id(own_id))
            yield tag, prompts.messages(text, schema, uri)


def llm_probe(root: str, groups: pd.DataFrame, cfg: dict, labels: list[str], failures: FailureLog,
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
                        str(err), pending[(file, group, first, row)][1])
    tags = sorted(answers)
    table = probe_table(tags, [pending[t][0] for t in tags], [pending[t][1] for t in tags],
                        [answers[t]["label"] for t in tags], [float(answers[t]["confidence"]) for t in tags])
    return (table if len(table) else empty_probe()), summary


def image_probe(root: str, groups: pd.DataFrame, labels: list[str], cfg: dict, failures: FailureLog,
                stats: ShardStats, progress: TextIO | None, seed: int, device_spec: str, precision_spec: str,
                threads: int, jpeg_decoder: str) -> pd.DataFrame:
    """PROBE_COLUMNS of the shard's images by a local model: `clip_zero_shot` or `classifier`. The readers start
    before the model is built where its input size is known from its config, so the two overlap."""
    from tqdm import tqdm

    from mlprep.devices import job_device, resolve_batch_size, select_precision, start_context
    from mlprep.encoders import ModelSpec, build_encoder, image_size_of
    from mlprep.workers import resolve_workers

    pcfg = cfg["probe"]
    stats.mark("imports")
    device = job_device(device_spec, threads)
    spec = ModelSpec.from_config(pcfg["model"], seed)
    batch = resolve_batch_size(pcfg["batch_size"], device)
    reader = dict(image_column=cfg["image_column"], label_column=cfg["label_column"], images_dir=cfg.get("images_dir"),
                  id_column=id_column(cfg), storage=cfg.get("object_storage"))
    size = image_size_of(spec)
    workers = resolve_workers(pcfg["decode_workers"], device, threads)
    chunks = None
    if size is not None:
        chunks = probe_chunks(root, groups, labels, size, batch, workers, device, jpeg_decoder, **reader)
        stats.mark("readers_started")
    context = start_context(device)
    encoder = build_encoder(spec, device, select_precision(precision_spec, device), batch,
                            text=pcfg["backend"] == "clip_zero_shot")
    if context is not None:
        context.join()
    stats.mark("model_built")
    if encoder.warm_up():
        stats.mark("kernels_loaded")
    if pcfg["backend"] == "classifier":
        probe = Classifier(encoder, labels, pcfg.get("classes"))
    else:
        probe = ZeroShot(encoder, labels, pcfg["prompt_template"])
    parts = []
    with tqdm(total=int(groups["rows"].sum()), desc="probe", unit="img", file=progress, mininterval=2.0) as bar:
        for part in probe_rows(root, groups, probe, failures, workers=workers,
                               jpeg_decoder=jpeg_decoder, chunks=chunks, on_encoded=stats.first_item_done,
                               **reader):
            parts.append(part)
            bar.update(len(part))
    stats.extra.update(encoding_batch_size=batch, decode_workers=workers, model=encoder.identity())
    stats.extra["device"] = str(device)
    return pd.concat(parts, ignore_index=True) if parts else empty_probe()


def empty_probe() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in PROBE_DTYPES.items()})[PROBE_COLUMNS]


def probe_shard(shard_text: str, list_path: Path | str, labels_path: Path | str, cfg: dict, continue_on_error: bool,
                out_dir: Path | str, cache_path: Path | str, progress: TextIO | None = None, seed: int = 0,
                device_spec: str = "cpu", precision_spec: str = "fp32", threads: int = 1,
                jpeg_decoder: str = "auto") -> dict:
    """Probe one shard's row groups; the folder is written whole or not at all."""
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    groups = pd.DataFrame(ShardLists.read(list_path, LIST_COLUMNS), columns=LIST_COLUMNS)
    labels = read_labels(labels_path)
    root = str(cfg["data_dir"])  # a folder or an s3:// URL (read with cfg's object_storage)
    failures = FailureLog(continue_on_error)
    backend = cfg["probe"]["backend"]
    llm_summary = None
    if backend in ("clip_zero_shot", "classifier"):
        table = image_probe(root, groups, labels, cfg, failures, stats, progress, seed, device_spec,
                                precision_spec, threads, jpeg_decoder)
    elif backend == "openai":
        prompts.check_template("probe.prompt", cfg["probe"]["prompt"])
        table, llm_summary = llm_probe(root, groups, cfg, labels, failures, cache_path, progress)
    else:
        raise ValueError(f"probe_qa.probe.backend: unknown backend {backend!r}")
    table = table.astype(PROBE_DTYPES).sort_values(["file", "row"], kind="stable").reset_index(drop=True)
    stats.ok, stats.failed = len(table), len(failures)
    stats.counts = {"correct": int(table["correct"].sum()), "row_groups": len(groups)}
    stats.extra = {**stats.extra, "backend": backend, "labels": len(labels), "llm": llm_summary, **scheduler_ids()}
    with atomic_dir(out_dir) as folder:
        write_parquet(table[PROBE_COLUMNS], folder / SHARD_FILES["probe"], "probe.probe")
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data

