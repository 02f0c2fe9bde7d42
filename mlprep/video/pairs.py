"""Reading `train_pairs.json` into clip items, split and sharded by stable hashes.

Accepted shapes (see config/README.md): a list of pair objects, that list under "pairs", "data",
"items" or "clips", an object mapping clip id -> pair object, or a list of [clip, text] /
[clip, text, start, end] arrays. Per pair: the clip file from clip | path | video | video_path |
file | clip_path | vid (relative to clips_dir; a bare id gets `clip_ext` appended when that file
exists), the id from id | clip_id | video_id | uid (default: the clip path without extension), the
text from text | caption | transcript | utterance | description, and an optional window from
start | start_time | begin and end | end_time | stop (seconds).

With `input_format` webdataset or parquet the clips lie in containers (mlprep.sources): a pair names a member
(`a.mp4`) or its key (`a`); without a pairs file, every video member (or row) is a pair of its own, its id the
key, its text and window from its sample's `.txt` / `.json` (or its row's columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import Failure, InputError, failures_frame
from mlprep.files import file_stats
from mlprep.ids import normalise_paths, shards_of, unsafe_path_reasons
from mlprep.records import RecordsError, coalesce, read_records
from mlprep.rng import derive_seed
from mlprep.sharding import ShardId
from mlprep.shardlists import CatalogCache, ShardLists, encode_lines, source_key
from mlprep.sources import (LOCATION_COLUMNS, VIDEO_COLUMNS, LocatedItem, display_path, display_paths,
                            index_dataset, locate, media_key, sample_meta)
from mlprep.storage import is_remote

LIST_KEYS = ("pairs", "data", "items", "clips")
PATH_KEYS = ("clip", "path", "video", "video_path", "file", "clip_path", "vid")
ID_KEYS = ("id", "clip_id", "video_id", "uid")
TEXT_KEYS = ("text", "caption", "transcript", "utterance", "description")
START_KEYS = ("start", "start_time", "begin")
END_KEYS = ("end", "end_time", "stop")
COLUMNS = ["clip_id", "text", "clip", "path", "start", "end", "split", "shard"]
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")  # a video member a key names, in this order
META_FIELDS = ("txt", *TEXT_KEYS, *START_KEYS, *END_KEYS)  # what a sample's .txt / .json or row may give


@dataclass(frozen=True)
class ClipItem(LocatedItem):
    clip_id: str
    text: str
    clip: str  # as written, relative to clips_dir
    path: str  # resolved absolute path of the file, or of the container that holds the clip
    start: float | None
    end: float | None
    split: str
    shard: int
    member: str = ""  # in a container: the member (tar) or the row's name (parquet); "" for a file
    offset: int = -1
    size: int = -1
    group: int = -1
    stamp: str = ""


# What a shard's list holds per clip: all a decode job needs and where its bytes lie (mlprep.sources: the file, or
# the container, member, offset, size and row group), with a stamp (a file's mtime, a container's size and mtime or
# ETag) so that an edited clip or container changes its line and reruns its shard.
LIST_COLUMNS = ["clip_id", "clip", *LOCATION_COLUMNS, "start", "end", "text"]


def shard_list_lines(frame: pd.DataFrame) -> list[str]:
    kinds = {"offset": "int", "size": "int", "group": "int", "start": "num", "end": "num"}
    return encode_lines({c: (kinds.get(c, "str"), frame[c]) for c in LIST_COLUMNS})


def items_from_list(rows: list[dict], split: str, shard: int) -> list[ClipItem]:
    return [ClipItem(r["clip_id"], r["text"], r["clip"], r["path"], r["start"], r["end"], split, shard, r["member"],
                     r["offset"], r["size"], r["group"], r["stamp"]) for r in rows]


@dataclass(frozen=True)
class PairCatalog:
    table: pd.DataFrame  # valid pairs in file order: COLUMNS + LOCATION_COLUMNS[1:]
    failures: list[Failure]

    @cached_property
    def items(self) -> list[ClipItem]:
        """The valid pairs, sorted by clip id."""
        table = self.table.sort_values("clip_id", kind="stable")
        return [ClipItem(*row) for row in table[[*COLUMNS, *LOCATION_COLUMNS[1:]]].itertuples(index=False)]

    def frame(self) -> pd.DataFrame:
        """The manifest, sorted by clip id (a clip in a container: `path` is `<container>#<member>`)."""
        table = self.table.assign(path=display_paths(self.table))
        return table[COLUMNS].sort_values("clip_id", kind="stable").astype(
            {"clip_id": "string", "text": "string", "clip": "string", "path": "string", "split": "string",
             "start": "Float64", "end": "Float64", "shard": "int64"}
        ).reset_index(drop=True)


@dataclass(frozen=True)
class ParsedPairs:
    """What the pairs file says, before any clip file is looked at (cacheable while the file is unchanged)."""

    candidates: pd.DataFrame  # COLUMNS, in file order; paths not yet checked
    failures: list[Failure]


def split_of(clip_id: str, seed: int, split_mode: str, val_ratio: float) -> str:
    """'train' or 'val' from a hash of (seed, id): a clip never changes split when pairs are added."""
    if split_mode == "all_train":
        return "train"
    return "val" if derive_seed(seed, "split", clip_id) / 2**64 < val_ratio else "train"


def _as_record(raw) -> dict | None:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (list, tuple)) and 2 <= len(raw) <= 4:
        return dict(zip(("clip", "text", "start", "end"), raw))
    return None


def _seconds(values: np.ndarray, what: str) -> tuple[np.ndarray, dict[int, str]]:
    """Seconds as floats (NaN where absent) and a reason per row whose value is not usable."""
    absent = pd.isna(pd.Series(values, dtype=object)).to_numpy() | (values == "")
    numbers = pd.to_numeric(pd.Series(np.where(absent, None, values), dtype=object), errors="coerce")
    numbers = numbers.to_numpy(dtype=np.float64)
    errors = {}
    for i in np.flatnonzero(~absent & np.isnan(numbers)):
        errors[int(i)] = f"{what} {values[i]!r} is not a number of seconds"
    for i in np.flatnonzero(numbers < 0):
        errors[int(i)] = f"{what} is negative"
    return numbers, errors


def _strip_suffix(clips: list[str]) -> list[str]:
    """What Path(clip).with_suffix('').as_posix() gives: the clip path without its extension. With string
    operations where every path is already normal (pathlib costs ~10 us a path)."""
    if normalise_paths(clips) is not clips:
        return [Path(c).with_suffix("").as_posix() for c in clips]
    out = []
    for clip in clips:
        dot = clip.rfind(".")
        out.append(clip[:dot] if clip.rfind("/") + 1 < dot < len(clip) - 1 else clip)
    return out


def parse_pairs(
    pairs_json: Path | str,
    clips_dir: Path | str,
    shards: dict[str, int],
    split_mode: str = "all_train",
    val_ratio: float = 0.1,
    seed: int = 0,
    records: list | None = None,
    contained: bool = False,
) -> ParsedPairs:
    """Every pair the file names (or `records`, (key, record) pairs as read_records gives them), with ids, splits,
    shards and paths; record problems become failures. `contained`: the clips lie in containers, `path` is the
    clip's name there (located by check_contained).

    Whole columns at a time: a million pairs take seconds."""
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS}).astype(
        {"start": "float64", "end": "float64", "shard": "int64"})
    if records is None:
        pairs_json = Path(pairs_json)
        try:
            records = read_records(pairs_json, LIST_KEYS)
        except RecordsError as err:
            return ParsedPairs(empty, [Failure("", str(pairs_json), "manifest", "unreadable_list", str(err))])
    if not records:
        return ParsedPairs(empty, [Failure("", str(pairs_json), "manifest", "empty_list", "pairs file holds no pairs")])
    failures: list[Failure] = []
    dicts, positions, key_ids = [], [], []
    for position, (key_id, raw) in enumerate(records):
        record = _as_record(raw)
        if record is None:
            reason = f"pair entry is {type(raw).__name__}, not an object"
            failures.append(Failure("", f"{pairs_json}#{position}", "manifest", "bad_record", reason))
            continue
        dicts.append(record)
        positions.append(position)
        key_ids.append(key_id)
    table = pd.DataFrame.from_records(dicts) if dicts else pd.DataFrame(index=range(0))
    keys = np.asarray(key_ids, dtype=object)
    has_key = np.fromiter((k is not None for k in key_ids), dtype=bool, count=len(key_ids))
    clip = coalesce(table, PATH_KEYS)
    ids = coalesce(table, ID_KEYS)
    clip = np.where(pd.isna(pd.Series(clip, dtype=object)), np.where(has_key, keys, ids), clip)
    frame = pd.DataFrame({"position": positions, "clip": clip, "key_id": keys, "id": ids,
                          "text": coalesce(table, TEXT_KEYS), "start": coalesce(table, START_KEYS),
                          "end": coalesce(table, END_KEYS)})
    no_clip = frame["clip"].isna().to_numpy()
    for position in frame["position"][no_clip]:
        reason = f"pair names no clip (looked for {', '.join(PATH_KEYS)})"
        failures.append(Failure("", f"{pairs_json}#{position}", "manifest", "bad_record", reason))
    frame = frame[~no_clip].reset_index(drop=True)
    frame["clip"] = frame["clip"].astype(str)
    given = frame["key_id"].where(frame["key_id"].notna(), frame["id"])
    derived = pd.Series(_strip_suffix(frame["clip"].tolist()), dtype=object)
    frame["clip_id"] = given.where(given.notna(), derived).astype(str)

    first = frame.groupby("clip_id", sort=False)[["position", "clip"]].transform("first")
    duplicate = frame["clip_id"].duplicated(keep="first").to_numpy()
    for row, other, other_clip in zip(np.flatnonzero(duplicate), first["position"][duplicate],
                                      first["clip"][duplicate]):
        clip_id = frame.at[row, "clip_id"]
        reason = f"duplicate clip id {clip_id!r}: pair #{other} ({other_clip}) has it already and is kept"
        failures.append(Failure(clip_id, f"{pairs_json}#{frame.at[row, 'position']}", "manifest", "duplicate_id",
                                reason))
    frame = frame[~duplicate].reset_index(drop=True)

    starts, bad_start = _seconds(frame["start"].to_numpy(dtype=object), "start")
    ends, bad_end = _seconds(frame["end"].to_numpy(dtype=object), "end")
    bad = {**bad_end, **bad_start}
    for i in np.flatnonzero(ends <= starts):  # NaN compares false: only where both are given
        bad.setdefault(int(i), f"end {ends[i]} is not after start {starts[i]}")
    for row, reason in sorted(bad.items()):
        failures.append(Failure(frame.at[row, "clip_id"], frame.at[row, "clip"], "manifest", "bad_window", reason))
    frame["start"], frame["end"] = starts, ends
    frame = frame.drop(index=sorted(bad)).reset_index(drop=True)

    frame["normal"] = normalise_paths(frame["clip"].tolist())
    if contained:  # a member's name, looked up in the index (whose members were checked for safety)
        frame["path"] = frame["normal"]
    else:
        root = Path(clips_dir).resolve()
        unsafe = unsafe_path_reasons(frame["normal"].tolist(), root)
        for row, reason in unsafe:
            failures.append(Failure(frame.at[row, "clip_id"], frame.at[row, "clip"], "manifest", "unsafe_path",
                                    reason))
        frame = frame.drop(index=[r for r, _ in unsafe]).reset_index(drop=True)
        frame["path"] = f"{root}/" + frame["normal"]

    clip_ids = frame["clip_id"].tolist()
    if split_mode == "all_train":
        splits = np.full(len(frame), "train", dtype=object)
    else:
        draws = np.fromiter((derive_seed(seed, "split", c) for c in clip_ids), dtype=np.uint64, count=len(clip_ids))
        splits = np.where(draws / 2**64 < val_ratio, "val", "train").astype(object)
    frame["split"] = splits
    frame["shard"] = np.zeros(len(frame), dtype=np.int64)
    for split, count in shards.items():
        rows = np.flatnonzero(splits == split)
        frame.loc[rows, "shard"] = shards_of([clip_ids[i] for i in rows], count)
    return ParsedPairs(frame[COLUMNS], failures)


def _usable(frame: pd.DataFrame, failures: list[Failure], missing: np.ndarray, reason: str) -> PairCatalog:
    """The catalog of the located candidates: one without its clip or without text is a failure."""
    for clip_id, path in zip(frame["clip_id"][missing], frame["path"][missing]):
        failures.append(Failure(clip_id, path, "manifest", "missing", reason))
    no_text = ~missing & frame["text"].isna().to_numpy()
    for clip_id, path, member in zip(frame["clip_id"][no_text], frame["path"][no_text], frame["member"][no_text]):
        reason = f"pair has no text (looked for {', '.join(TEXT_KEYS)})"
        failures.append(Failure(clip_id, display_path(path, member), "manifest", "bad_record", reason))
    frame = frame[~missing & ~no_text].copy()
    frame["text"] = frame["text"].astype(str)
    frame["start"] = frame["start"].astype(object).where(frame["start"].notna(), None)
    frame["end"] = frame["end"].astype(object).where(frame["end"].notna(), None)
    return PairCatalog(frame[[*COLUMNS, *LOCATION_COLUMNS[1:]]].reset_index(drop=True), failures)


def check_contained(parsed: ParsedPairs, index) -> PairCatalog:
    """The catalog of pairs whose clips lie in the containers of `index` (mlprep.sources.DatasetIndex): each clip
    is a member's name or a key with a video member."""
    located = locate(index, parsed.candidates["path"].tolist(), VIDEO_EXTS)
    frame = parsed.candidates.assign(**{c: located[c].to_numpy() for c in LOCATION_COLUMNS})
    frame["path"] = frame["path"].where(frame["path"] != "", parsed.candidates["clip"])
    missing = (frame["size"] < 0).to_numpy()
    return _usable(frame, list(parsed.failures) + list(index.problems), missing,
                   "no container member or key of that name")


def container_records(index) -> list[tuple[None, dict]]:
    """A pair per video member (tars) or row (parquet) of the containers, for a data set without a pairs file: the
    key is its id, its sample's `.txt` (or a text field of its `.json` or row) its text."""
    frame = index.frame
    if index.fmt == "webdataset":
        frame = frame[frame["ext"].isin(VIDEO_EXTS)]
    records = []
    for name, key, meta in zip(frame["name"], frame["key"], frame["meta"]):
        fields = sample_meta(meta)
        if index.fmt == "parquet":
            key = media_key(key, VIDEO_EXTS)
        record = {"clip": name, "id": key, **{k: v for k, v in fields.items() if k != "txt"}}
        if "txt" in fields and not any(k in fields for k in TEXT_KEYS):
            record["text"] = fields["txt"]
        records.append((None, record))
    return records


def check_clip_files(parsed: ParsedPairs, size: np.ndarray, mtime_ns: np.ndarray, clip_ext: str) -> PairCatalog:
    """The catalog, given each candidate's file stats. A bare id whose file is missing is tried with
    `clip_ext` appended; pairs without a clip file or without text become failures."""
    frame = parsed.candidates.assign(size=size, mtime_ns=mtime_ns)
    retry = np.flatnonzero((size < 0) & ~frame["clip"].str.rsplit("/", n=1).str[-1].str.contains(".", regex=False))
    if len(retry):
        with_ext = [p + clip_ext for p in frame["path"].to_numpy()[retry]]
        ext_size, ext_mtime = file_stats(with_ext)
        found = ext_size >= 0
        frame.loc[retry[found], "path"] = np.asarray(with_ext, dtype=object)[found]
        frame.loc[retry[found], "size"] = ext_size[found]
        frame.loc[retry[found], "mtime_ns"] = ext_mtime[found]
    frame = frame.assign(member="", offset=np.int64(-1), group=np.int64(-1), stamp=frame["mtime_ns"].astype(str))
    return _usable(frame, list(parsed.failures), (frame["size"] < 0).to_numpy(), "clip file not found")


def _cache(pairs_json, clips_dir, shards, split_mode, val_ratio, seed, folder, contained=False) -> CatalogCache:
    where = str(clips_dir) if is_remote(clips_dir) else str(Path(clips_dir).resolve())
    return CatalogCache(folder, {"pairs": source_key(pairs_json), "clips_dir": where, "contained": contained,
                                 "shards": shards, "split_mode": split_mode, "val_ratio": val_ratio, "seed": seed})


def cached_parse(pairs_json, clips_dir, shards, split_mode, val_ratio, seed, folder, contained=False):
    """parse_pairs through the catalog cache in `folder` (the shard lists' folder)."""
    cache = _cache(pairs_json, clips_dir, shards, split_mode, val_ratio, seed, folder, contained)
    hit = cache.load()
    if hit is not None:
        candidates, failures = hit
        candidates = candidates.astype({"start": "float64", "end": "float64"})
        return ParsedPairs(candidates, [Failure(**row) for row in failures.to_dict("records")]), cache
    parsed = parse_pairs(pairs_json, clips_dir, shards, split_mode, val_ratio, seed, contained=contained)
    cache.save(parsed.candidates, failures_frame(parsed.failures), "video.catalog")
    return parsed, cache


def read_pairs(
    pairs_json: Path | str,
    clips_dir: Path | str,
    shards: dict[str, int],
    split_mode: str = "all_train",
    val_ratio: float = 0.1,
    seed: int = 0,
    clip_ext: str = ".mp4",
    cache_folder: Path | str | None = None,
) -> PairCatalog:
    """Every usable pair, and a failure for every other; through the catalog cache when given a folder."""
    if cache_folder is None:
        parsed = parse_pairs(pairs_json, clips_dir, shards, split_mode, val_ratio, seed)
    else:
        parsed, _ = cached_parse(pairs_json, clips_dir, shards, split_mode, val_ratio, seed, cache_folder)
    return check_clip_files(parsed, *file_stats(parsed.candidates["path"].tolist()), clip_ext)


def contained(cfg: dict) -> bool:
    """Whether the clips lie in containers (input_format webdataset or parquet); files need a pairs file."""
    if cfg.get("input_format", "files") != "files":
        return True
    if not cfg.get("pairs"):
        raise InputError("video_frames.pairs: a pairs file is needed with input_format: files (only containers "
                         "carry their own texts)")
    if is_remote(cfg["clips_dir"]):
        raise InputError(f"video_frames.clips_dir: {cfg['clips_dir']} is in object storage, where clips are read "
                         f"from containers: set input_format to webdataset or parquet (docs/your-data.md)")
    return False


def clip_index(cfg: dict, folder, storage: dict | None = None):
    """The containers' index (mlprep.sources.index_dataset), cached in `folder`, with each sample's text and
    window fields."""
    return index_dataset(cfg["clips_dir"], cfg["input_format"], folder, cfg.get("parquet_column", "auto"),
                         cfg.get("parquet_key", "auto"), storage, VIDEO_COLUMNS, META_FIELDS)


def _contained_catalog(cfg: dict, seed: int, shards: dict[str, int], folder, storage, lists_complete=False):
    """(catalog, or None when nothing changed since the lists were written, what changes when an input changes,
    and the catalog cache where there is a pairs file)."""
    index = clip_index(cfg, folder, storage)
    stats = index.stats()
    if cfg.get("pairs"):
        parsed, cache = cached_parse(cfg["pairs"], cfg["clips_dir"], shards, cfg["split_mode"], cfg["val_ratio"],
                                     seed, folder, contained=True)
        if lists_complete and cache.same_stats(stats):
            return None, stats, cache
    else:
        parsed, cache = parse_pairs(str(cfg["clips_dir"]), cfg["clips_dir"], shards, cfg["split_mode"],
                                    cfg["val_ratio"], seed, records=container_records(index), contained=True), None
    return check_contained(parsed, index), stats, cache


def load_catalog(cfg: dict, seed: int, shards: dict[str, int], folder, storage: dict | None = None) -> PairCatalog:
    """Every usable pair of the config's clips (files or containers), a failure for every other (the manifest)."""
    if contained(cfg):
        return _contained_catalog(cfg, seed, shards, folder, storage)[0]
    return read_pairs(cfg["pairs"], cfg["clips_dir"], shards, cfg["split_mode"], cfg["val_ratio"], seed,
                      cfg["clip_ext"], cache_folder=folder)


def count_clips(cfg: dict, folder, storage: dict | None = None) -> int:
    """How many pairs there are before any check (what items_per_shard sizes shards by)."""
    if cfg.get("pairs"):
        return count_pairs(cfg["pairs"])
    return len(container_records(clip_index(cfg, folder, storage)))


def count_pairs(pairs_json: Path | str) -> int:
    """How many records the pairs file holds, before any check (what items_per_shard sizes shards by)."""
    try:
        return len(read_records(pairs_json, LIST_KEYS))
    except RecordsError:
        return 0


def list_name(split: str, shard: int, count: int) -> str:
    return f"{split}/{ShardId(shard, count)}"


def sync_lists(cfg: dict, seed: int, shards: dict[str, int], lists: ShardLists,
               storage: dict | None = None) -> dict[str, str]:
    """Bring the shard lists ('train/000-of-002', ...) in step with the pairs and clip files (or containers)."""
    if contained(cfg):
        catalog, stats, cache = _contained_catalog(cfg, seed, shards, lists.folder, storage, lists.complete())
        if catalog is None:
            return lists.fingerprints()
    else:
        parsed, cache = cached_parse(cfg["pairs"], cfg["clips_dir"], shards, cfg["split_mode"], cfg["val_ratio"],
                                     seed, lists.folder)
        size, mtime = file_stats(parsed.candidates["path"].tolist())
        stats = np.stack([size, mtime], axis=1)
        if cache.same_stats(stats) and lists.complete():
            return lists.fingerprints()
        catalog = check_clip_files(parsed, size, mtime, cfg["clip_ext"])
    table = catalog.table
    position = {name: k for k, name in enumerate(lists.names)}
    split = table["split"].to_numpy(dtype=object)
    index = table["shard"].to_numpy(dtype=np.int64).copy()
    for name, count in shards.items():  # a split's lists are consecutive in `names`, from its shard 0 on
        index[split == name] += position[list_name(name, 0, count)]
    lists.sync(index, shard_list_lines(table))
    if cache is not None:
        cache.save_stats(stats)
    return lists.fingerprints()


def sync_lists_from(cfg: dict, seed: int, shards: dict[str, int], folder: str, names: list[str],
                    storage: dict | None = None) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(cfg, seed, shards, ShardLists(folder, names, LIST_COLUMNS), storage)
