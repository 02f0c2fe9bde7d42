"""The speaker_embed pipeline's cheap steps: manifest, gather, check; the heavy one is
mlprep.speaker.embed.embed_shard."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from mlprep.failures import FailureLog, check_failed_share, count_by_code, read_failures, write_failures
from mlprep.ids import safe_filename
from mlprep.io import atomic_dir, atomic_path, load_npy, read_json, save_npy, write_json, write_parquet, write_table
from mlprep.sources import display_paths
from mlprep.speaker.corpus import UTTERANCE_COLUMNS, durations, list_corpus
from mlprep.speaker.embed import SHARD_FILES
from mlprep.speaker.speakers import SKIPPED_COLUMNS, speakers_arrow

log = logging.getLogger(__name__)


def manifest(cfg: dict, n_shards: int, continue_on_error: bool, outputs: dict, storage: dict | None = None,
             lists_folder: str | None = None) -> None:
    """Every utterance with its ids, shard, file size and (audio files) duration from the header. In containers
    the duration is left null (reading every member's header here would read the data set in one job; the shard
    jobs record each utterance's duration in utterances.parquet)."""
    corpus = list_corpus(cfg, n_shards, storage=storage, cache_folder=lists_folder)
    failures = FailureLog(continue_on_error)
    failures.extend(corpus.failures)
    frame = corpus.frame
    files = cfg["input"] == "audio" and cfg.get("input_format", "files") == "files"
    # precomputed embeddings have no duration: null, in the one manifest schema
    frame = frame.assign(duration_s=durations(frame["path"].tolist()) if files else float("nan"),
                         path=display_paths(frame))
    frame = frame[[*UTTERANCE_COLUMNS, "size", "stamp", "duration_s"]]
    write_parquet(frame, outputs["manifest"], "speaker.manifest")
    write_failures(failures.records, outputs["failures"])
    log.info("%d utterances of %d speakers in %d shards, %d failures", len(frame),
             frame.groupby(["dataset", "speaker_id"]).ngroups, n_shards, len(failures))


def _speakers_table(table: pd.DataFrame, embeddings: np.ndarray) -> pa.Table:
    """The speakers with their embedding as a fixed-size list column (what Arrow readers take as a vector)."""
    from mlprep.tables import speakers_schema

    arrow = speakers_arrow(table)
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    schema = speakers_schema(dim)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, schema.field("embedding").type.list_size) if dim else \
        pa.array([], schema.field("embedding").type)  # no speaker kept: an empty table the check reports on
    return arrow.append_column(schema.field("embedding"), column)


def speaker_pickle_name(dataset: str, speaker_id: str) -> str:
    """'<dataset>/<speaker>.pkl' from untrusted ids: no separators or '..' survive, distinct ids stay distinct."""
    return f"{safe_filename(dataset)}/{safe_filename(speaker_id)}.pkl"


def write_speaker_pickles(table: pd.DataFrame, embeddings: np.ndarray, folder: Path) -> None:
    """One pickle per speaker with the seed's record layout, at <dataset>/<speaker>.pkl (sanitised names)."""
    made: set[Path] = set()
    for row, vector in zip(table.to_dict("records"), embeddings):
        stats = {k: float(row.pop(f"embedding_{k}")) for k in ("mean", "std", "min", "max")}
        lists = {k: [str(v) for v in row[k]] for k in ("utterance_list", "original_paths")}
        record = {**row, **lists, "embedding": vector, "embedding_stats": stats}
        path = folder / speaker_pickle_name(row["dataset"], row["speaker_id"])
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        with open(path, "wb") as handle:
            pickle.dump(record, handle, protocol=pickle.HIGHEST_PROTOCOL)


def gather(shard_dirs: list[str], manifest_failures: str, write_pickles: bool, outputs: dict) -> dict:
    """Concatenate the shards (speakers are shard-local, so no re-aggregation) and write the outputs."""
    folders = [Path(d) for d in shard_dirs]
    tables = [pd.read_parquet(f / SHARD_FILES["speakers"]) for f in folders]
    vectors = [load_npy(f / SHARD_FILES["speaker_embeddings"]) for f in folders]
    dims = {v.shape[1] for v in vectors if len(v)}
    if len(dims) > 1:
        raise ValueError(f"speaker_embed: shards made embeddings of different lengths {sorted(dims)}; "
                         "set speaker_embed.embedding_dim to the length your embeddings have")
    table = pd.concat(tables, ignore_index=True)
    dim = dims.pop() if dims else 0
    embeddings = np.concatenate([v.reshape(-1, dim) if len(v) else np.zeros((0, dim), np.float32) for v in vectors])
    order = np.argsort(table["speaker_key"].to_numpy(), kind="stable")
    table, embeddings = table.iloc[order].reset_index(drop=True), np.ascontiguousarray(embeddings[order])

    utterances = pd.concat([pd.read_parquet(f / SHARD_FILES["utterances"]) for f in folders], ignore_index=True)
    utt_vectors = np.concatenate([load_npy(f / SHARD_FILES["utterance_embeddings"]).reshape(-1, dim or 1)
                                  for f in folders]) if dim else np.zeros((0, 0), np.float32)
    u_order = np.argsort(utterances["item_id"].to_numpy(), kind="stable")
    skipped = pd.concat([pd.read_parquet(f / SHARD_FILES["skipped"]) for f in folders], ignore_index=True)
    skipped = skipped.sort_values("speaker_key", kind="stable").reset_index(drop=True)[SKIPPED_COLUMNS]
    failures = read_failures([manifest_failures, *(f / SHARD_FILES["failures"] for f in folders)])

    write_table(_speakers_table(table, embeddings), outputs["speakers"], "speaker.speakers")
    save_npy(embeddings, outputs["speaker_embeddings"])
    with atomic_path(outputs["speaker_ids"]) as tmp:
        tmp.write_text("".join(f"{key}\n" for key in table["speaker_key"]), encoding="utf-8")
    save_npy(np.ascontiguousarray(utt_vectors[u_order]) if len(utt_vectors) else utt_vectors,
             outputs["utterance_embeddings"])
    write_parquet(utterances.iloc[u_order].reset_index(drop=True), outputs["utterances"], "speaker.utterances")
    write_parquet(skipped, outputs["skipped"], "speaker.skipped")
    write_parquet(failures, outputs["failures"], "failures")
    if write_pickles:
        with atomic_dir(outputs["pickles"]) as folder:
            write_speaker_pickles(table, embeddings, folder)
    else:
        Path(outputs["pickles"]).mkdir(parents=True, exist_ok=True)
    stats = [read_json(f / SHARD_FILES["stats"]) for f in folders]
    summary = {
        "speakers": int(len(table)), "speakers_skipped": int(len(skipped)), "embedding_dim": int(dim),
        "utterances_ok": int(len(utterances)), "utterances_failed": int(len(failures)),
        "failures_by_code": count_by_code(failures),
        "utterances_per_speaker": {q: float(table["num_utterances"].quantile(p)) if len(table) else None
                                   for q, p in (("min", 0.0), ("median", 0.5), ("max", 1.0))},
        "mean_spread": float(table["spread"].mean()) if len(table) else None,
        # the utterance encoder that made the embeddings (None for precomputed ones): what `mlprep serve` loads
        "model": next((s["model_config"] for s in stats if s.get("model_config")), None),
        "shards": {s["shard"]: {k: s.get(k) for k in ("items_ok", "items_failed", "seconds", "startup_s")}
                   for s in stats},
    }
    write_json(summary, outputs["summary"])
    log.info("gathered %d speakers (%d skipped) from %d shards", len(table), len(skipped), len(folders))
    return summary


def check(summary_path, failures_path, max_failed_fraction: float, out) -> dict:
    """Fail the run when no utterance, or too large a share of them, could be used."""
    summary = read_json(summary_path)
    result = check_failed_share("speaker_embed", summary["utterances_ok"], pd.read_parquet(failures_path),
                                max_failed_fraction, failures_path)
    result["speakers"] = summary["speakers"]
    write_json(result, out)
    log.info("check passed: %s", result)
    return result


def evaluate(utterances_path, utterance_embeddings, speakers_path, speaker_embeddings, per_speaker: int, seed: int,
             p_target: float, outputs: dict, threshold: float | None = None) -> dict:
    """Held-out identification and verification metrics, and the report's plot."""
    from mlprep.speaker import evaluate as metrics

    utterances = pd.read_parquet(utterances_path)
    vectors = load_npy(utterance_embeddings)
    result = metrics.evaluate(utterances["speaker_key"], utterances["item_id"], vectors, per_speaker, seed, p_target,
                              threshold)
    result["note"] = ("held-out utterances scored against centroids of each speaker's other utterances; the "
                      "speaker embeddings in speakers.parquet use every utterance")
    write_json(result, outputs["eval"])
    speakers = pd.read_parquet(speakers_path, columns=["speaker_key"])
    with atomic_path(outputs["plot"]) as tmp:
        metrics.plot(utterances["speaker_key"], utterances["item_id"], vectors, load_npy(speaker_embeddings),
                     speakers["speaker_key"].tolist(), result, per_speaker, seed, tmp)
    log.info("evaluation: %s", result)
    return result
