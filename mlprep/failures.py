"""Per-shard failure tables: a bad item is recorded with its id, path, stage and reason, or stops the job."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mlprep.io import write_parquet

FAILURE_COLUMNS = ["item_id", "path", "stage", "reason"]


class ItemFailedError(RuntimeError):
    """Raised for a bad item when continue_on_error is off; the message names the file."""


@dataclass(frozen=True)
class Failure:
    item_id: str
    path: str
    stage: str
    reason: str


@dataclass
class FailureLog:
    """Collects failures under continue_on_error, or raises at the first one without it."""

    continue_on_error: bool
    records: list[Failure] = field(default_factory=list)

    def record(self, item_id: str, path: str | Path, stage: str, reason: str) -> None:
        failure = Failure(str(item_id), str(path), stage, reason)
        if not self.continue_on_error:
            raise ItemFailedError(
                f"{failure.path}: {stage} failed for item {failure.item_id!r}: {reason} "
                "(set continue_on_error: true to record such items and go on)"
            )
        self.records.append(failure)

    def extend(self, failures: Iterable[Failure]) -> None:
        for failure in failures:
            self.record(failure.item_id, failure.path, failure.stage, failure.reason)

    def __len__(self) -> int:
        return len(self.records)

    def to_frame(self) -> pd.DataFrame:
        return failures_frame(self.records)


def failures_frame(records: Iterable[Failure]) -> pd.DataFrame:
    rows = [asdict(r) for r in records]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS).astype("string")


def write_failures(records: Iterable[Failure], path: Path | str) -> None:
    write_parquet(failures_frame(records), path)


def read_failures(paths: Iterable[Path | str]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return failures_frame([])
    return pd.concat(frames, ignore_index=True).astype("string")
