"""Listing a speech corpus: utterances (audio files or precomputed embeddings) per dataset and speaker.

Two ways in (config/README.md, speaker_embed):
  - a folder laid out as {dataset}/{speaker_id}/{utterance}.{wav,flac,mp3,...} (or .npy embeddings); files in
    deeper folders below a speaker (LibriSpeech's chapters) belong to that speaker, their utterance id
    being the path below the speaker folder without the extension;
  - a manifest CSV or parquet with columns dataset, speaker_id, utterance_id, path (relative to the
    corpus folder).
  - (`input_format` webdataset or parquet) containers of audio (mlprep.sources): a tar's audio
    members or a parquet file's audio column, each item's ids from its sample's `.json` or row columns
    (`dataset`, `speaker_id` or `speaker`, `utterance_id`), else from its key (`ids_from_key`).
Every utterance of a speaker lands in one shard (a stable hash of dataset and speaker id), so a
speaker's embedding is made inside one shard job, and a new speaker reruns only its shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import Failure, InputError
from mlprep.files import file_stats
from mlprep.ids import normalise_paths, shards_of, unsafe_path_reasons
from mlprep.shardlists import ShardLists, encode_lines
from mlprep.speaker.audio import header_seconds
from mlprep.sources import AUDIO_COLUMNS, LOCATION_COLUMNS, display_path, index_dataset, media_key, sample_meta
from mlprep.storage import is_remote

# libsndfile reads the first five, PyAV the rest (mlprep.speaker.audio)
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm")
AUDIO_NAMES = tuple(e.lstrip(".") for e in AUDIO_EXTS)  # as a tar member's or parquet name's extension
EMBEDDING_EXTS = (".npy",)
PICKLE_EXTS = (".pkl",)  # only with trust_pickles: unpickling runs code from the file
MANIFEST_COLUMNS = ["dataset", "speaker_id", "utterance_id", "path"]
UTTERANCE_COLUMNS = ["item_id", "dataset", "speaker_id", "utterance_id", "path", "shard"]
# What a shard's list holds per utterance: what its job needs and where its bytes lie (mlprep.sources: the file,
# or the container, member, offset, size and row group), with a stamp (a file's mtime, a container's size and mtime
# or ETag) so that an edited file or container changes its line and reruns its shard.
LIST_COLUMNS = ["dataset", "speaker_id", "utterance_id", *LOCATION_COLUMNS]
META_FIELDS = ("dataset", "speaker_id", "speaker", "utterance_id")  # what a sample's .json or row may say


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
    frame: pd.DataFrame  # UTTERANCE_COLUMNS + LOCATION_COLUMNS[1:]; sorted by item_id
    failures: list[Failure]


def ids_from_key(key: str, meta: dict, default_dataset: str, separator: str) -> tuple[str, str, str] | None:
    """(dataset, speaker id, utterance id) of a sample in a container, or None when no speaker can be told.

    The sample's own metadata wins (`dataset`, `speaker_id` or `speaker`, `utterance_id`); what it leaves open comes
    from the key: `{dataset}/{speaker}/{utterance...}` (the folder layout, packed into a tar with its paths),
    `{speaker}/{utterance}`, or a bare key whose speaker is the part before the first `separator` (LibriSpeech's
    `103-1240-0000` is speaker 103), the utterance id being the whole key. A dataset neither names is
    `default_dataset`."""
    parts = key.split("/")
    if len(parts) >= 3:
        k_dataset, k_speaker, k_utterance = parts[0], parts[1], "/".join(parts[2:])
    elif len(parts) == 2:
        k_dataset, k_speaker, k_utterance = None, parts[0], parts[1]
    else:
        head, sep, _ = key.partition(separator) if separator else ("", "", "")
        k_dataset, k_speaker, k_utterance = None, (head if sep and head else None), key
    speaker = meta.get("speaker_id", meta.get("speaker", k_speaker))
    if speaker is None or str(speaker).strip() == "":
        return None
    dataset = meta.get("dataset") or k_dataset or default_dataset
    return str(dataset), str(speaker), str(meta.get("utterance_id") or k_utterance)


def _container_utterances(cfg: dict, storage: dict | None, cache_folder) -> tuple[pd.DataFrame, list[Failure], np.ndarray]:
    """The audio items of a data set of containers: MANIFEST_COLUMNS (path: `<container>#<member>`) with their
    LOCATION_COLUMNS, the containers' problems, and what changes when any container changes."""
    if cfg["input"] != "audio":
        raise InputError(f"speaker_embed.input_format: {cfg['input_format']} reads audio; precomputed embeddings "
                         f"(input: {cfg['input']}) are read from files (input_format: files)")
    if cfg.get("manifest"):
        raise InputError("speaker_embed.manifest: with input_format " f"{cfg['input_format']} the utterances and "
                         "their ids come from the containers; set manifest to null")
    index = index_dataset(cfg["corpus_dir"], cfg["input_format"], cache_folder, cfg.get("parquet_column", "auto"),
                          cfg.get("parquet_key", "auto"), storage, AUDIO_COLUMNS, META_FIELDS)
    frame = index.frame
    default_dataset = str(cfg["corpus_dir"]).rstrip("/").rsplit("/", 1)[-1]
    separator = cfg.get("speaker_separator", "-")
    failures = list(index.problems)
    if cfg["input_format"] == "webdataset":
        audio = frame["ext"].isin(AUDIO_NAMES)
        has_audio = set(zip(frame["container"][audio], frame["key"][audio]))
        orphans = frame[~audio].drop_duplicates(["container", "key"])
        for container, key, name in zip(orphans["container"], orphans["key"], orphans["name"]):
            if (container, key) not in has_audio:
                failures.append(Failure("", display_path(f"{index.root}/{container}", name), "manifest", "missing",
                                        f"sample {key!r} has no audio member ({', '.join(AUDIO_EXTS)})"))
        frame = frame[audio]
        keys = frame["key"]
    else:  # a row's name may carry the file's extension (`a.wav`): the key is what is left
        keys = frame["key"].map(lambda k: media_key(k, AUDIO_NAMES))
    rows, kept = [], []
    for position, (key, meta, container, name) in enumerate(zip(keys, frame["meta"], frame["container"],
                                                                frame["name"])):
        ids = ids_from_key(key, sample_meta(meta), default_dataset, separator)
        if ids is None:
            failures.append(Failure("", display_path(f"{index.root}/{container}", name), "manifest", "bad_record",
                                    f"no speaker for {key!r}: its key has no {separator!r} or folder and no "
                                    f"speaker_id in its metadata"))
            continue
        rows.append(ids)
        kept.append(position)
    frame = frame.iloc[kept]
    out = pd.DataFrame(rows, columns=["dataset", "speaker_id", "utterance_id"], dtype=object)
    out["path"] = (index.root + "/" + frame["container"]).to_numpy()
    out["member"] = frame["name"].astype(str).to_numpy()
    out["offset"] = frame["offset"].to_numpy(np.int64)
    out["size"] = frame["size"].to_numpy(np.int64) if cfg["input_format"] == "webdataset" else np.int64(0)
    out["group"] = frame["group"].to_numpy(np.int64)
    out["stamp"] = frame["container"].map(index.stamps).to_numpy()
    return out, failures, index.stats()


def list_corpus(cfg: dict, n_shards: int, with_stats: bool = True, storage: dict | None = None,
                cache_folder: Path | str | None = None) -> Corpus:
    """The utterances the config names, with ids and shards; unsafe paths, duplicate ids and missing
    files become failures (never a silent drop). Containers' indexes are cached in `cache_folder`."""
    contained = cfg.get("input_format", "files") != "files"
    if not contained and is_remote(cfg["corpus_dir"]):
        raise InputError(f"speaker_embed.corpus_dir: {cfg['corpus_dir']} is in object storage, where audio is read "
                         f"from containers: set input_format to webdataset or parquet (docs/your-data.md)")
    failures: list[Failure] = []
    stats = None
    if contained:
        frame, failures, stats = _container_utterances(cfg, storage, cache_folder)
        root = None
    else:
        root = Path(cfg["corpus_dir"]).resolve()
        if cfg.get("manifest"):
            frame = read_manifest(cfg["manifest"])
            frame["path"] = normalise_paths(frame["path"].tolist())
        else:
            frame = scan_layout(root, extensions(cfg["input"], bool(cfg.get("trust_pickles"))))
    frame["item_id"] = utterance_ids(frame["dataset"], frame["speaker_id"], frame["utterance_id"])
    where = (frame["path"] + "#" + frame["member"]) if contained else frame["path"]
    empty = (frame["dataset"].str.strip() == "") | (frame["speaker_id"].str.strip() == "") | (
        frame["utterance_id"].str.strip() == "")
    nul = frame["item_id"].str.contains("\x00", regex=False) & ~empty  # no file system or C library takes it
    for mask, reason in ((empty, "empty dataset, speaker or utterance id"),
                         (nul, "a NUL character in the dataset, speaker or utterance id")):
        for item_id, path in zip(frame["item_id"][mask], where[mask]):
            failures.append(Failure(item_id, path, "manifest", "bad_record", reason))
    frame = frame[~(empty | nul)].reset_index(drop=True)
    if not contained:  # a container's members were checked by the index (mlprep.containers)
        unsafe = unsafe_path_reasons(frame["path"].tolist(), root)
        for position, reason in unsafe:
            row = frame.iloc[position]
            failures.append(Failure(row["item_id"], row["path"], "manifest", "unsafe_path", reason))
        frame = frame.drop(index=[p for p, _ in unsafe])
    frame = frame.sort_values(["item_id", "path", *(["member"] if contained else [])], kind="stable")
    where = (frame["path"] + "#" + frame["member"]) if contained else frame["path"]
    duplicated = frame["item_id"].duplicated(keep="first")
    if duplicated.any():
        involved = where[frame["item_id"].isin(set(frame["item_id"][duplicated]))]
        first = dict(zip(frame["item_id"][involved.index][::-1], involved[::-1]))  # the first path wins
        for item_id, path in zip(frame["item_id"][duplicated], where[duplicated]):
            failures.append(Failure(item_id, path, "manifest", "duplicate_id",
                                    f"utterance id already taken by {first[item_id]}, which is kept"))
    frame = frame[~duplicated].reset_index(drop=True)
    if not contained:
        frame["path"] = f"{root}/" + frame["path"]
        frame = frame.assign(member="", offset=np.int64(-1), size=np.int64(-1), group=np.int64(-1), stamp="")
    frame["shard"] = shards_of(speaker_keys(frame["dataset"], frame["speaker_id"]).tolist(), n_shards)
    frame = frame[UTTERANCE_COLUMNS + LOCATION_COLUMNS[1:]]
    if not with_stats or contained:
        return Corpus(frame, failures)
    size, mtime = file_stats(frame["path"].tolist())
    missing = size < 0
    for item_id, path in zip(frame["item_id"][missing], frame["path"][missing]):
        failures.append(Failure(item_id, path, "manifest", "missing", "file not found"))
    frame = frame.assign(size=size, stamp=mtime.astype(str))[~missing].reset_index(drop=True)
    return Corpus(frame, failures)


def count_utterances(cfg: dict, storage: dict | None = None, cache_folder: Path | str | None = None) -> int:
    """How many utterances the corpus lists (what items_per_shard sizes shards by)."""
    return len(list_corpus(cfg, 1, with_stats=False, storage=storage, cache_folder=cache_folder).frame)


def shard_list_lines(frame: pd.DataFrame) -> list[str]:
    kinds = {"offset": "int", "size": "int", "group": "int"}
    return encode_lines({c: (kinds.get(c, "str"), frame[c]) for c in LIST_COLUMNS})


def sync_lists(cfg: dict, lists: ShardLists, storage: dict | None = None) -> dict[str, str]:
    """Bring the shard lists in step with the corpus; return shard -> fingerprint."""
    corpus = list_corpus(cfg, len(lists.names), storage=storage, cache_folder=lists.folder)
    lists.sync(corpus.frame["shard"].to_numpy(), shard_list_lines(corpus.frame))
    return lists.fingerprints()


def sync_lists_from(cfg: dict, folder: str, shards: list[str], storage: dict | None = None) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(cfg, ShardLists(folder, shards, LIST_COLUMNS), storage)


def rows_from_list(rows: list[dict]) -> pd.DataFrame:
    """A shard job's utterances, from its list: UTTERANCE_COLUMNS without shard, and their locations."""
    frame = pd.DataFrame(rows, columns=LIST_COLUMNS).astype({c: str for c in MANIFEST_COLUMNS[:3]})
    frame["item_id"] = utterance_ids(frame["dataset"], frame["speaker_id"], frame["utterance_id"])
    return frame.sort_values("item_id", kind="stable").reset_index(drop=True)


def durations(paths: list[str]) -> np.ndarray:
    """Seconds of each audio file from its header (soundfile.info, or PyAV's for what libsndfile does not read:
    no decoding); NaN where unreadable."""
    import soundfile

    out = np.full(len(paths), np.nan)
    for i, path in enumerate(paths):
        try:
            info = soundfile.info(path)
            out[i] = info.frames / info.samplerate if info.samplerate else np.nan
        except Exception:  # noqa: BLE001 - an unreadable header is the shard job's failure to record
            out[i] = header_seconds(path)
    return out
