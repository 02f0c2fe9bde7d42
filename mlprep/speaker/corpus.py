"""Listing a speech corpus: utterances (audio files or precomputed embeddings) per dataset and speaker.

Two ways in (config/README.md, speaker_embed):
  - a folder laid out as {dataset}/{speaker_id}/{utterance}.{wav,flac} (or .npy embeddings); files in
    deeper folders below a speaker (LibriSpeech's chapters) belong to that speaker, their utterance id
    being the path below the speaker folder without the extension;
  - a manifest CSV or parquet with columns dataset, speaker_id, utterance_id, path (relative to the
    corpus folder).
Every utterance of a speaker lands in one shard (a stable hash of dataset and speaker id), so a
speaker's embedding is made inside one shard job, and a new speaker reruns only its shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import Failure
from mlprep.files import file_stats
from mlprep.ids import normalise_paths, shards_of, unsafe_path_reasons
from mlprep.shardlists import ShardLists, encode_lines

AUDIO_EXTS = (".wav", ".flac")
EMBEDDING_EXTS = (".npy",)
PICKLE_EXTS = (".pkl",)  # only with trust_pickles: unpickling runs code from the file
MANIFEST_COLUMNS = ["dataset", "speaker_id", "utterance_id", "path"]
UTTERANCE_COLUMNS = ["item_id", "dataset", "speaker_id", "utterance_id", "path", "shard"]
# What a shard's list holds per utterance: what its job needs, and the file's size and mtime.
LIST_COLUMNS = ["dataset", "speaker_id", "utterance_id", "path", "size", "mtime_ns"]


def _escape(values: pd.Series) -> pd.Series:
    return values.str.replace("%", "%25", regex=False).str.replace("/", "%2F", regex=False)


def speaker_keys(datasets: pd.Series, speakers: pd.Series) -> pd.Series:
    """'<dataset>/<speaker_id>' with '%' and '/' escaped in both: unambiguous, the unit of sharding."""
    return _escape(datasets.astype(str)) + "/" + _escape(speakers.astype(str))


def utterance_ids(datasets: pd.Series, speakers: pd.Series, utterances: pd.Series) -> pd.Series:
    """'<dataset>/<speaker_id>/<utterance_id>': the speaker key holds no unescaped '/', so no utterance
    id can forge another speaker's utterance."""
    return speaker_keys(datasets, speakers) + "/" + utterances.astype(str)


def extensions(input_kind: str, trust_pickles: bool = False) -> tuple[str, ...]:
    if input_kind == "audio":
        return AUDIO_EXTS
    return EMBEDDING_EXTS + (PICKLE_EXTS if trust_pickles else ())


def scan_layout(root: Path | str, exts: tuple[str, ...]) -> pd.DataFrame:
    """Every file with one of `exts` under root/{dataset}/{speaker}/ (any depth below the speaker)."""
    root = Path(root)
    rows: list[tuple[str, str, str, str]] = []
    for dataset in sorted(os.scandir(root), key=lambda e: e.name):
        if not dataset.is_dir() or dataset.name.startswith("."):
            continue
        for speaker in sorted(os.scandir(dataset.path), key=lambda e: e.name):
            if not speaker.is_dir() or speaker.name.startswith("."):
                continue
            base = len(speaker.path) + 1
            for folder, dirs, files in os.walk(speaker.path, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in exts and not name.startswith("."):
                        rel = f"{folder[base:]}/{stem}" if len(folder) > len(speaker.path) else stem
                        rows.append((dataset.name, speaker.name, rel, f"{folder}/{name}"[len(str(root)) + 1 :]))
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS, dtype=object)


def read_manifest(path: Path | str) -> pd.DataFrame:
    """A manifest CSV or parquet with MANIFEST_COLUMNS; a missing column is an error naming it."""
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(
        path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has {', '.join(frame.columns)})")
    return frame[MANIFEST_COLUMNS].astype(str).reset_index(drop=True)


@dataclass(frozen=True)
class Corpus:
    frame: pd.DataFrame  # UTTERANCE_COLUMNS + size, mtime_ns; sorted by item_id
    failures: list[Failure]


def list_corpus(cfg: dict, n_shards: int, with_stats: bool = True) -> Corpus:
    """The utterances the config names, with ids and shards; unsafe paths, duplicate ids and missing
    files become failures (never a silent drop)."""
    root = Path(cfg["corpus_dir"]).resolve()
    failures: list[Failure] = []
    if cfg.get("manifest"):
        frame = read_manifest(cfg["manifest"])
        frame["path"] = normalise_paths(frame["path"].tolist())
    else:
        frame = scan_layout(root, extensions(cfg["input"], bool(cfg.get("trust_pickles"))))
    frame["item_id"] = utterance_ids(frame["dataset"], frame["speaker_id"], frame["utterance_id"])
    empty = (frame["dataset"].str.strip() == "") | (frame["speaker_id"].str.strip() == "") | (
        frame["utterance_id"].str.strip() == "")
    nul = frame["item_id"].str.contains("\x00", regex=False) & ~empty  # no file system or C library takes it
    for mask, reason in ((empty, "empty dataset, speaker or utterance id"),
                         (nul, "a NUL character in the dataset, speaker or utterance id")):
        for item_id, path in zip(frame["item_id"][mask], frame["path"][mask]):
            failures.append(Failure(item_id, path, "manifest", "bad_record", reason))
    frame = frame[~(empty | nul)].reset_index(drop=True)
    unsafe = unsafe_path_reasons(frame["path"].tolist(), root)
    for position, reason in unsafe:
        row = frame.iloc[position]
        failures.append(Failure(row["item_id"], row["path"], "manifest", "unsafe_path", reason))
    frame = frame.drop(index=[p for p, _ in unsafe]).sort_values(["item_id", "path"], kind="stable")
    duplicated = frame["item_id"].duplicated(keep="first")
    if duplicated.any():
        involved = frame[frame["item_id"].isin(set(frame["item_id"][duplicated]))]
        first = dict(zip(involved["item_id"][::-1], involved["path"][::-1]))  # the first path wins
        for item_id, path in zip(frame["item_id"][duplicated], frame["path"][duplicated]):
            failures.append(Failure(item_id, path, "manifest", "duplicate_id",
                                    f"utterance id already taken by {first[item_id]}, which is kept"))
    frame = frame[~duplicated].reset_index(drop=True)
    frame["path"] = f"{root}/" + frame["path"]
    frame["shard"] = shards_of(speaker_keys(frame["dataset"], frame["speaker_id"]).tolist(), n_shards)
    frame = frame[UTTERANCE_COLUMNS]
    if not with_stats:
        return Corpus(frame, failures)
    size, mtime = file_stats(frame["path"].tolist())
    missing = size < 0
    for item_id, path in zip(frame["item_id"][missing], frame["path"][missing]):
        failures.append(Failure(item_id, path, "manifest", "missing", "file not found"))
    frame = frame.assign(size=size, mtime_ns=mtime)[~missing].reset_index(drop=True)
    return Corpus(frame, failures)


def count_utterances(cfg: dict) -> int:
    """How many utterances the corpus lists (what items_per_shard sizes shards by)."""
    return len(list_corpus(cfg, 1, with_stats=False).frame)


def shard_list_lines(frame: pd.DataFrame) -> list[str]:
    return encode_lines({c: ("int" if c in ("size", "mtime_ns") else "str", frame[c]) for c in LIST_COLUMNS})


def sync_lists(cfg: dict, lists: ShardLists) -> dict[str, str]:
    """Bring the shard lists in step with the corpus; return shard -> fingerprint."""
    corpus = list_corpus(cfg, len(lists.names))
    lists.sync(corpus.frame["shard"].to_numpy(), shard_list_lines(corpus.frame))
    return lists.fingerprints()


def sync_lists_from(cfg: dict, folder: str, shards: list[str]) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(cfg, ShardLists(folder, shards, LIST_COLUMNS))


def rows_from_list(rows: list[dict]) -> pd.DataFrame:
    """A shard job's utterances, from its list: UTTERANCE_COLUMNS without shard."""
    frame = pd.DataFrame(rows, columns=LIST_COLUMNS).astype({c: str for c in MANIFEST_COLUMNS})
    frame["item_id"] = utterance_ids(frame["dataset"], frame["speaker_id"], frame["utterance_id"])
    return frame.sort_values("item_id", kind="stable").reset_index(drop=True)


def durations(paths: list[str]) -> np.ndarray:
    """Seconds of each audio file from its header (soundfile.info: no decoding); NaN where unreadable."""
    import soundfile

    out = np.full(len(paths), np.nan)
    for i, path in enumerate(paths):
        try:
            info = soundfile.info(path)
            out[i] = info.frames / info.samplerate if info.samplerate else np.nan
        except Exception:  # noqa: BLE001 - an unreadable header is the shard job's failure to record
            pass
    return out
