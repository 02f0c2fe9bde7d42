"""Failure tables shared by every pipeline: a bad item is recorded with its id, path, stage, a stable
reason code and a human reason, or stops the job; and the gate that fails a run where too much failed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mlprep.io import write_parquet
from mlprep.tables import FAILURES

# `id`: the item's own id in its dataset where the data names one (probe_qa's `id_column`), else null
FAILURE_COLUMNS = FAILURES.names

# Every code a failure row may carry. Summaries count by code, so a code never changes meaning;
# config/README.md lists them for users.
REASON_CODES: dict[str, str] = {
    "unreadable_list": "the list file (sku_data.json, train_pairs.json) is not JSON of an accepted shape",
    "empty_list": "the list file holds no records",
    "bad_record": "a record is not an object, or lacks a field it needs (id, image, clip, text)",
    "duplicate_id": "the record's id is already taken by an earlier record, which is kept",
    "no_images": "a SKU lists no images",
    "bad_window": "a clip's start/end window is invalid (negative, or end not after start)",
    "missing": "the file does not exist",
    "unsafe_path": "the path is absolute or leaves the folder it must stay in",
    "not_a_file": "a container member is a link, a device or another non-regular file",
    "unkeyed_member": "a container member's name is not `key.ext` (webdataset's naming: the key ends at the file "
                      "name's first dot)",
    "duplicate_key": "a container member repeats the key and extension of an earlier member, which is kept",
    "bad_container": "a tar or parquet file of the data set cannot be indexed (not a tar, compressed, unreadable)",
    "changed": "the container changed or vanished between the index and the job (the next run re-indexes it)",
    "storage_error": "the object store failed the request through every retry (throttled with 503 SlowDown, "
                     "5xx, dropped connections; object_storage.max_attempts)",
    "not_an_image": "no image decoder recognises the file",
    "not_a_video": "no video demuxer recognises the file",
    "no_video_stream": "the file holds no video stream",
    "no_frames": "the video stream holds no frames",
    "empty_window": "the clip's [start, end) window holds no frames",
    "truncated": "the file ends or breaks before the data it announces",
    "decoder_timeout": "the decoder did not answer within timeout_s; its process was killed",
    "decoder_crash": "the decoder process died (a crash in native code)",
    "decode_error": "another decoder error; the reason says which",
    "not_audio": "no audio reader recognises the file",
    "empty_audio": "the audio file holds no samples",
    "bad_audio": "the audio samples hold NaN or infinity",
    "too_short": "the utterance is shorter than min_seconds",
    "too_long": "an uploaded recording is longer than the service accepts",
    "too_many_pixels": "the image's header declares more pixels than accepted (a possible decompression bomb): "
                       "more than Pillow's limit anywhere, or the service's max_image_pixels for an upload",
    "silent": "the utterance holds no sound (every sample near zero, or nothing left after trimming silences)",
    "bad_embedding": "a precomputed embedding file is not a finite 1-D numeric array (or is a pickle, untrusted)",
    "wrong_dimension": "a precomputed embedding's length differs from embedding_dim (or the shard's usual length)",
    "unreadable_table": "the price file is not a readable CSV or parquet table",
    "empty_file": "the price file holds no rows",
    "missing_column": "the price file lacks a column it needs (date, open, high, low, close), or a parquet dataset "
                      "file lacks the image, label or id column",
    "bad_date": "a price row's date does not parse (the row is dropped)",
    "bad_value": "a price row holds a missing, non-numeric, zero or negative price, or high below low (dropped)",
    "duplicate_date": "a price row repeats an earlier row's date; the first is kept",
    "too_few_bars": "the symbol keeps fewer bars than one window plus the horizon",
    "bad_row_group": "a parquet row group does not decode (the file's other row groups are read)",
    "unknown_point": "a row of the K-line sample file names a date and asset that no window ends on",
    "llm_rate_limited": "the LLM endpoint kept answering 429 (rate limited) through every retry",
    "llm_http_error": "the LLM endpoint answered an HTTP error (5xx through every retry, or a 4xx)",
    "llm_timeout": "the LLM endpoint did not answer within timeout_s, through every retry",
    "llm_connection": "the LLM endpoint could not be reached, through every retry",
    "llm_malformed_response": "the LLM endpoint's body was not a chat completion, through every retry",
    "llm_bad_output": "the model's answer was not the JSON asked for (not JSON, or missing/invalid fields), "
                      "through every retry",
}


class InputError(ValueError):
    """Input that no job could get past (the data against the config), found while the DAG is built; reported
    with its message alone."""


class ItemFailedError(RuntimeError):
    """Raised for a bad item when continue_on_error is off; the message names the file."""


class ItemError(Exception):
    """A problem with one input item, carrying its reason code; the message is the human reason."""

    def __init__(self, code: str, message: str):
        if code not in REASON_CODES:
            raise ValueError(f"unknown failure reason code {code!r}")
        super().__init__(message)
        self.code = code


def decoder_message(err: Exception) -> str:
    """The decoder's message without the in-memory buffer's address PIL puts in it (`<_io.BytesIO object at
    0x...>`): a failure's reason must be the same in every run."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", " (in-memory file)", str(err))


def describe_error(err: BaseException, default_code: str = "decode_error") -> tuple[str, str]:
    """(reason code, human reason) for an exception: its own code when it has one, else `default_code`
    with the exception's type in the reason (an unexpected error should say what it was)."""
    code = getattr(err, "code", None)
    if code in REASON_CODES:
        return code, str(err)
    return default_code, f"{getattr(err, 'kind', None) or type(err).__name__}: {err}"


@dataclass(frozen=True)
class Failure:
    item_id: str
    path: str
    stage: str
    reason_code: str
    reason: str
    id: str | None = None

    def __post_init__(self) -> None:
        if self.reason_code not in REASON_CODES:
            raise ValueError(f"unknown failure reason code {self.reason_code!r}")


@dataclass
class FailureLog:
    """Collects failures under continue_on_error, or raises at the first one without it."""

    continue_on_error: bool
    records: list[Failure] = field(default_factory=list)

    def record(self, item_id: str, path: str | Path, stage: str, code: str, reason: str,
               own_id: str | None = None) -> None:
        own = None if own_id is None or pd.isna(own_id) else str(own_id)
        failure = Failure(str(item_id), str(path), stage, code, reason, own)
        if not self.continue_on_error:
            raise ItemFailedError(
                f"{failure.path}: {stage} failed for item {failure.item_id!r}: {reason} [{code}] "
                "(set continue_on_error: true to record such items and go on)"
            )
        self.records.append(failure)

    def extend(self, failures: Iterable[Failure]) -> None:
        for f in failures:
            self.record(f.item_id, f.path, f.stage, f.reason_code, f.reason, f.id)

    def __len__(self) -> int:
        return len(self.records)

    def to_frame(self) -> pd.DataFrame:
        return failures_frame(self.records)


def failures_frame(records: Iterable[Failure]) -> pd.DataFrame:
    rows = [asdict(r) for r in records]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS).astype("string")


def write_failures(records: Iterable[Failure], path: Path | str) -> None:
    write_parquet(failures_frame(records), path, "failures")


def read_failures(paths: Iterable[Path | str]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return failures_frame([])
    return pd.concat(frames, ignore_index=True).astype("string")


def count_by_code(failures: pd.DataFrame) -> dict[str, int]:
    """Failure counts per reason code, most frequent first."""
    if not len(failures):
        return {}
    return {str(k): int(v) for k, v in failures["reason_code"].value_counts().items()}


class TooManyFailuresError(RuntimeError):
    """A run in which no item, or too large a share of items, succeeded."""


def check_failed_share(pipeline: str, n_ok: int, failures: pd.DataFrame, max_fraction: float,
                       failures_path: Path | str) -> dict:
    """Counts of ok and failed items; raises TooManyFailuresError when nothing succeeded or the failed
    share exceeds `max_fraction` (1.0 turns the share test off; an empty result always fails)."""
    n_failed = int(len(failures))
    total = n_ok + n_failed
    share = n_failed / total if total else 0.0
    result = {
        "pipeline": pipeline,
        "items_ok": int(n_ok),
        "items_failed": n_failed,
        "failed_share": round(share, 6),
        "max_failed_fraction": max_fraction,
        "failures_by_code": count_by_code(failures),
    }
    if n_ok and share <= max_fraction:
        return result
    if not total:
        raise TooManyFailuresError(f"{pipeline}: the run produced nothing: no item succeeded and none failed")
    top = failures["reason_code"].value_counts().index[0]
    example = failures[failures["reason_code"] == top].iloc[0]
    headline = (
        f"no item succeeded ({n_failed} failed)" if not n_ok
        else f"{n_failed} of {total} items failed ({share:.1%}, more than max_failed_fraction {max_fraction})"
    )
    raise TooManyFailuresError(
        f"{pipeline}: {headline}; most common reason: {top} ({result['failures_by_code'][top]} items), "
        f"e.g. {example['path']}: {example['reason']}. Every failure is listed in {failures_path}."
    )
