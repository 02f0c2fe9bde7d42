"""Reading one symbol's price file (CSV or parquet) into clean daily bars, or failures with reasons.

Accepted column spellings (case, spaces and underscores ignored; config/README.md, kline_factor):
  date:   date, datetime, timestamp, time, trade_date, 日期, 交易日期, 时间
  open, high, low, close (or 开盘, 最高, 最低, 收盘, each also with 价); adjusted close: adj close, adj_close,
  adjclose, adjusted_close
  volume: volume, vol, 成交量 (optional; 0 where absent)
A CSV is read as UTF-8 (a byte-order mark is fine), else as GB18030 (GBK, what Excel writes on Chinese Windows).
With `adjusted: true` (default) and an adjusted close present, the close is the adjusted one and open/high/
low are scaled by the same factor per bar (what split- and dividend-adjusted charts show).

Dates keep their own wall time: a timezone-aware date keeps its calendar day and clock time (its offset
dropped), so a sample file of calendar dates matches the bars of any exchange.
A bad row (unparsable date, a non-numeric, missing, zero or negative price, high below low) is dropped with
one failure record naming the row; a repeated date keeps its first row and records the others; rows out
of date order are sorted. A file that cannot be read, lacks a column or keeps fewer bars than one window
plus the horizon is one failure for the symbol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import Failure, ItemError

ALIASES = {  # and the Chinese headers AKShare and the exchanges' own exports write (日期, 开盘, 最高, ...)
    "date": ("date", "datetime", "timestamp", "time", "tradedate", "日期", "交易日期", "时间"),
    "open": ("open", "开盘", "开盘价"),
    "high": ("high", "最高", "最高价"),
    "low": ("low", "最低", "最低价"),
    "close": ("close", "收盘", "收盘价"),
    "adjclose": ("adjclose", "adjustedclose"),
    "volume": ("volume", "vol", "成交量"),
}
REQUIRED = ("date", "open", "high", "low", "close")
PRICE_COLUMNS = ["open", "high", "low", "close"]
BAR_COLUMNS = ["date", "open", "high", "low", "close", "volume"]
PRICE_EXTS = (".csv", ".parquet")
ROW_STAGE = "read_row"  # the stage of a dropped row's failure (item id `<symbol>@row<line>`); a file's is "read"


@dataclass
class Bars:
    symbol: str
    path: str
    frame: pd.DataFrame  # BAR_COLUMNS, dates strictly increasing (datetime64[ns], no time zone)
    failures: list[Failure] = field(default_factory=list)  # the rows dropped


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", str(name).lower())


def find_columns(columns) -> dict[str, str]:
    """canonical name -> the file's column name; ItemError(missing_column) naming what is absent."""
    by_key: dict[str, str] = {}
    for column in columns:
        by_key.setdefault(_key(column), column)
    found = {}
    for canonical, spellings in ALIASES.items():
        for spelling in spellings:
            if spelling in by_key:
                found[canonical] = by_key[spelling]
                break
    missing = [c for c in REQUIRED if c not in found]
    if missing:
        raise ItemError("missing_column", f"no {', '.join(missing)} column (has {', '.join(map(str, columns))})")
    return found


def read_table(path: str) -> pd.DataFrame:
    try:
        if path.lower().endswith(".parquet"):
            frame = pd.read_parquet(path)
        else:
            try:
                frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            except UnicodeDecodeError:  # not UTF-8: GBK, Excel's on Chinese Windows (GB18030 holds it)
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="gb18030")
    except pd.errors.EmptyDataError as err:
        raise ItemError("empty_file", "the file holds no rows") from err
    except Exception as err:  # noqa: BLE001 - any reader error is this file's failure
        raise ItemError("unreadable_table", f"not a readable CSV or parquet table: {err}") from err
    if len(frame) == 0:
        raise ItemError("empty_file", "the file holds no rows")
    return frame


_OFFSET = re.compile(r"^(.*\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?:Z|UTC|GMT|[+-]\d{2}:?\d{2})$")


def parse_dates(values: pd.Series) -> pd.Series:
    """Dates at their own wall time, naive: a value with a time zone ("2018-06-01 00:00:00-04:00", what
    yfinance writes; a tz-aware parquet column) keeps its calendar date and clock time and drops the offset,
    so daily bars stay on their trading day whatever the exchange's zone. Unparsable values become NaT."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_localize(None).astype("datetime64[ns]")
    if pd.api.types.is_datetime64_any_dtype(values):
        return values.astype("datetime64[ns]")
    text = values.astype(str).str.strip().str.replace(_OFFSET, r"\1", regex=True)
    return pd.to_datetime(text, errors="coerce", format="mixed")


def read_bars(symbol: str, path: str, min_bars: int, adjusted: bool = True) -> Bars:
    """The symbol's clean bars, or ItemError for the whole file."""
    raw = read_table(path)
    columns = find_columns(raw.columns)
    dates = parse_dates(raw[columns["date"]])
    values = {c: pd.to_numeric(raw[columns[c]], errors="coerce").to_numpy(dtype=np.float64)
              for c in ("open", "high", "low", "close", "adjclose", "volume") if c in columns}
    failures: list[Failure] = []
    bad = np.zeros(len(raw), dtype=bool)
    reasons = np.full(len(raw), "", dtype=object)

    def flag(mask: np.ndarray, code: str, reason: str) -> None:
        new = mask & ~bad
        reasons[new] = code + ":" + reason
        bad[:] = bad | mask

    flag(dates.isna().to_numpy(), "bad_date", "the date does not parse")
    prices = ["open", "high", "low", "close"] + (["adjclose"] if "adjclose" in values else [])
    for name in prices:
        column = values[name]
        flag(~np.isfinite(column), "bad_value", f"{name} is missing or not a number")
        flag(np.isfinite(column) & (column <= 0), "bad_value", f"{name} is zero or negative")
    flag(values["high"] < values["low"], "bad_value", "high is below low")
    if "volume" in values:
        volume = values["volume"]
        flag(np.isfinite(volume) & (volume < 0), "bad_value", "volume is negative")
    for row in np.flatnonzero(bad):
        code, reason = reasons[row].split(":", 1)
        failures.append(Failure(f"{symbol}@row{row + 2}", path, ROW_STAGE, code, reason))  # +2: header, 1-based
    keep = np.flatnonzero(~bad)
    close = values["adjclose"] if adjusted and "adjclose" in values else values["close"]
    factor = close / values["close"]
    frame = pd.DataFrame({
        "date": dates.to_numpy()[keep].astype("datetime64[ns]"),
        "open": (values["open"] * factor)[keep], "high": (values["high"] * factor)[keep],
        "low": (values["low"] * factor)[keep], "close": close[keep],
        "volume": np.nan_to_num(values["volume"][keep], nan=0.0) if "volume" in values else 0.0,
    })
    source_rows = keep + 2
    order = np.argsort(frame["date"].to_numpy(), kind="stable")
    frame, source_rows = frame.iloc[order].reset_index(drop=True), source_rows[order]
    repeated = frame["date"].duplicated(keep="first").to_numpy()
    for row, date in zip(source_rows[repeated], frame["date"][repeated]):
        failures.append(Failure(f"{symbol}@row{row}", path, ROW_STAGE, "duplicate_date",
                                f"{date.date()} already has a bar, the first one is kept"))
    frame = frame[~repeated].reset_index(drop=True)
    if len(frame) < min_bars:
        raise ItemError("too_few_bars", f"{len(frame)} usable bars, fewer than window + horizon = {min_bars}")
    return Bars(symbol, path, frame, failures)


def symbol_of(path: Path | str) -> str:
    """The symbol a price file holds: its name without the extension."""
    name = Path(path).name
    for ext in PRICE_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name
