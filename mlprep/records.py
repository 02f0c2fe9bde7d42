"""Reading user-written JSON lists of records (SKUs, video-text pairs) in the shapes people actually write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


class RecordsError(ValueError):
    """The file cannot be read as a list of records; the message names the file."""


def first_value(record: dict, keys: tuple[str, ...]):
    """The value of the first of `keys` that is present and not empty."""
    return next((record[k] for k in keys if record.get(k) not in (None, "", [])), None)


def _present(series: pd.Series) -> np.ndarray:
    """Where a column holds a value first_value would take: not missing, not '' and not []."""
    present = series.notna().to_numpy() & (series != "").to_numpy()
    if series.dtype == object:
        present &= ~series.map(lambda v: isinstance(v, list) and not v).to_numpy(dtype=bool)
    return present


def coalesce(table: pd.DataFrame, keys: tuple[str, ...]) -> np.ndarray:
    """first_value over whole columns: per row, the value of the first of `keys` present (else None)."""
    out = np.full(len(table), None, dtype=object)
    taken = np.zeros(len(table), dtype=bool)
    for key in keys:
        if key in table.columns:
            column = table[key]
            take = ~taken & _present(column)
            out[take] = column.to_numpy(dtype=object)[take]
            taken |= take
    return out


def read_records(path: Path | str, list_keys: tuple[str, ...]) -> list[tuple[str | None, object]]:
    """(id from a mapping key or None, record) pairs from a JSON file.

    Accepted: a list of records; an object holding that list under one of `list_keys`; an object
    mapping id -> record. An empty file, `[]` and `{}` give an empty list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordsError(f"{path}: unreadable JSON: {err}") from err
    if isinstance(data, list):
        return [(None, r) for r in data]
    if isinstance(data, dict):
        for key in list_keys:
            if isinstance(data.get(key), list):
                return [(None, r) for r in data[key]]
        if all(isinstance(v, dict) for v in data.values()):
            return [(str(k), v) for k, v in data.items()]
        raise RecordsError(f"{path}: expected a list of records or an object holding one under {'/'.join(list_keys)}")
    raise RecordsError(f"{path}: expected a JSON list or object, got {type(data).__name__}")
