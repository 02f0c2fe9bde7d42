"""Reading `train_pairs.json` into clip items, split and sharded by stable hashes.

Accepted shapes (see config/README.md): a list of pair objects, that list under "pairs", "data",
"items" or "clips", an object mapping clip id -> pair object, or a list of [clip, text] /
[clip, text, start, end] arrays. Per pair: the clip file from clip | path | video | video_path |
file | clip_path | vid (relative to clips_dir; a bare id gets `clip_ext` appended when that file
exists), the id from id | clip_id | video_id | uid (default: the clip path without extension), the
text from text | caption | transcript | utterance | description, and an optional window from
start | start_time | begin and end | end_time | stop (seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from mlprep.failures import Failure
from mlprep.ids import UnsafePathError, resolve_inside, shard_of
from mlprep.records import RecordsError, first_value, read_records
from mlprep.rng import derive_seed

LIST_KEYS = ("pairs", "data", "items", "clips")
PATH_KEYS = ("clip", "path", "video", "video_path", "file", "clip_path", "vid")
ID_KEYS = ("id", "clip_id", "video_id", "uid")
TEXT_KEYS = ("text", "caption", "transcript", "utterance", "description")
START_KEYS = ("start", "start_time", "begin")
END_KEYS = ("end", "end_time", "stop")
COLUMNS = ["clip_id", "text", "clip", "path", "start", "end", "split", "shard"]


@dataclass(frozen=True)
class ClipItem:
    clip_id: str
    text: str
    clip: str  # as written, relative to clips_dir
    path: str  # resolved absolute path
    start: float | None
    end: float | None
    split: str
    shard: int


@dataclass(frozen=True)
class PairCatalog:
    items: list[ClipItem]
    failures: list[Failure]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(i) for i in self.items], columns=COLUMNS).astype(
            {"clip_id": "string", "text": "string", "clip": "string", "path": "string", "split": "string",
             "start": "Float64", "end": "Float64", "shard": "int64"}
        )

    def shard_items(self, split: str, shard: int) -> list[ClipItem]:
        return [i for i in self.items if i.split == split and i.shard == shard]


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


def _seconds(value, what: str) -> float | None:
    if value is None or value == "":
        return None
    seconds = float(value)
    if seconds < 0:
        raise ValueError(f"{what} is negative")
    return seconds


def read_pairs(
    pairs_json: Path | str,
    clips_dir: Path | str,
    shards: dict[str, int],
    split_mode: str = "all_train",
    val_ratio: float = 0.1,
    seed: int = 0,
    clip_ext: str = ".mp4",
) -> PairCatalog:
    pairs_json = Path(pairs_json)
    try:
        records = read_records(pairs_json, LIST_KEYS)
    except RecordsError as err:
        return PairCatalog([], [Failure("", str(pairs_json), "manifest", "unreadable_list", str(err))])
    if not records:
        return PairCatalog([], [Failure("", str(pairs_json), "manifest", "empty_list", "pairs file holds no pairs")])
    items, failures = [], []
    first_pair: dict[str, tuple[int, str]] = {}  # clip id -> (position, clip) of the pair that holds it
    for position, (key_id, raw) in enumerate(records):
        where = f"{pairs_json}#{position}"
        record = _as_record(raw)
        if record is None:
            reason = f"pair entry is {type(raw).__name__}, not an object"
            failures.append(Failure("", where, "manifest", "bad_record", reason))
            continue
        clip = first_value(record, PATH_KEYS) or key_id or first_value(record, ID_KEYS)
        if clip is None:
            reason = f"pair names no clip (looked for {', '.join(PATH_KEYS)})"
            failures.append(Failure("", where, "manifest", "bad_record", reason))
            continue
        clip = str(clip)
        clip_id = str(key_id or first_value(record, ID_KEYS) or Path(clip).with_suffix("").as_posix())
        if clip_id in first_pair:
            other, other_clip = first_pair[clip_id]
            reason = f"duplicate clip id {clip_id!r}: pair #{other} ({other_clip}) has it already and is kept"
            failures.append(Failure(clip_id, where, "manifest", "duplicate_id", reason))
            continue
        first_pair[clip_id] = (position, clip)
        text = first_value(record, TEXT_KEYS)
        try:
            start = _seconds(first_value(record, START_KEYS), "start")
            end = _seconds(first_value(record, END_KEYS), "end")
            if start is not None and end is not None and end <= start:
                raise ValueError(f"end {end} is not after start {start}")
        except (ValueError, TypeError) as err:
            failures.append(Failure(clip_id, clip, "manifest", "bad_window", str(err)))
            continue
        try:
            path = resolve_inside(clips_dir, clip)
        except UnsafePathError as err:
            failures.append(Failure(clip_id, clip, "manifest", "unsafe_path", str(err)))
            continue
        if not path.is_file() and not Path(clip).suffix and path.with_name(path.name + clip_ext).is_file():
            path = path.with_name(path.name + clip_ext)
        if not path.is_file():
            failures.append(Failure(clip_id, str(path), "manifest", "missing", "clip file not found"))
            continue
        if text is None:
            reason = f"pair has no text (looked for {', '.join(TEXT_KEYS)})"
            failures.append(Failure(clip_id, str(path), "manifest", "bad_record", reason))
            continue
        split = split_of(clip_id, seed, split_mode, val_ratio)
        items.append(ClipItem(clip_id, str(text), clip, str(path), start, end, split, shard_of(clip_id, shards[split])))
    items.sort(key=lambda i: i.clip_id)
    return PairCatalog(items, failures)
