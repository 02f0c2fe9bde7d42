"""Reading parquet image datasets one row group at a time (never a whole file in memory).

The unit of work is a row group: `<file>#<row group>` is its stable id, hashed to its probe shard, so a
hundred parquet files of many row groups spread over the shards evenly and a new file reruns only the
shards its row groups land in. A row's id is `<file>:<row>`, its row counted from the file's start.

Images come as the datasets users hold them: raw bytes, a struct with `bytes` and/or `path` (how Hugging
Face `datasets` stores an Image feature), or a path string (relative to `images_dir`, never outside it).
A file whose footer cannot be read, a row group that does not decode and an image that does not open
are failure records with their reason; the rest of the shard goes on.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mlprep.failures import Failure, ItemError, decoder_message
from mlprep.ids import UnsafePathError, resolve_inside
from mlprep.sources import bytes_column, dataset_files, group_rows, join, open_parquet

log = logging.getLogger(__name__)

ROW_GROUP_COLUMNS = ["item_id", "file", "row_group", "first_row", "rows"]
AUTO = "auto"  # image_column: auto, the first of IMAGE_COLUMNS a file has
IMAGE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class RowGroups:
    frame: pd.DataFrame  # ROW_GROUP_COLUMNS, sorted by item_id
    failures: list[Failure]


def row_group_id(file: str, row_group: int) -> str:
    return f"{file}#{row_group}"


def row_id(file: str, row: int) -> str:
    return f"{file}:{row}"


def row_group_frame(files: list[str], rows_per_group: list[list[int]]) -> pd.DataFrame:
    """ROW_GROUP_COLUMNS from each file's row counts per group."""
    out = []
    for name, counts in zip(files, rows_per_group):
        first = 0
        for group, n in enumerate(counts):
            out.append((row_group_id(name, group), name, group, first, n))
            first += n
    return pd.DataFrame(out, columns=ROW_GROUP_COLUMNS).sort_values("item_id").reset_index(drop=True)


def list_row_groups(root: Path | str) -> RowGroups:
    """Every row group of every `*.parquet` under root (footers only: no data is read)."""
    names, counts, failures = [], [], []
    root, listed = dataset_files(root, "parquet")
    for name in listed:
        path = join(root, name)
        try:
            rows = group_rows(path)
        except Exception as err:  # noqa: BLE001 - any footer error is this file's failure
            failures.append(Failure(name, path, "manifest", "unreadable_table",
                                    f"not a readable parquet file: {err}"))
            continue
        if not sum(rows):
            log.warning("%s: the parquet file holds no rows (no item of it to probe)", path)
            continue
        names.append(name)
        counts.append(rows)
    return RowGroups(row_group_frame(names, counts), failures)


def read_row_group(root: Path | str, file: str, row_group: int, columns: list[str] | None = None,
                   optional: tuple[str, ...] = (), storage: dict | None = None) -> pd.DataFrame:
    """One row group as a DataFrame (`columns`, and those of `optional` the file has), or ItemError(bad_row_group).
    A column asked for as `auto` is the first image column the file has (mlprep.sources.IMAGE_COLUMNS), returned under the name
    `auto` (img2dataset's parquet calls it `jpg`, Hugging Face's `image`). `root` may be an s3:// URL, read with
    `storage`'s settings (mlprep.storage): the footer and the row group's columns, one ranged GET each."""
    try:
        handle = open_parquet(join(root, file), storage)
        if optional:
            columns = [*columns, *(c for c in optional if c in handle.schema_arrow.names and c not in columns)]
        auto = bytes_column(handle.schema_arrow, AUTO) if columns and AUTO in columns else None
        table = handle.read_row_group(row_group, columns=[auto if c == AUTO else c for c in columns]
                                      if auto else columns)
    except KeyError as err:
        raise ItemError("missing_column", f"{file}: {err.args[0]}") from err
    except Exception as err:  # noqa: BLE001
        raise ItemError("bad_row_group", f"row group {row_group} does not decode: {err}") from err
    frame = table.to_pandas()
    return frame.rename(columns={auto: AUTO}) if auto else frame  # the caller asked for the column `auto`


def iter_row_groups(root: Path | str, groups: pd.DataFrame, columns: list[str] | None,
                    failures, optional: tuple[str, ...] = (),
                    storage: dict | None = None) -> Iterator[tuple[str, int, pd.DataFrame]]:
    """(file, row group, rows) for each readable row group of `groups`; a bad one is recorded in `failures`
    (a FailureLog) and skipped."""
    for file, group in zip(groups["file"], groups["row_group"]):
        try:
            frame = read_row_group(root, file, int(group), columns, optional, storage)
        except ItemError as err:
            failures.record(row_group_id(file, int(group)), join(root, file), "read", err.code, str(err))
            continue
        yield file, int(group), frame


def group_images(root: Path | str, rows: pd.DataFrame, image_column: str, images_dir,
                 failures=None, storage: dict | None = None) -> Iterator[tuple[int, bytes]]:
    """(position in `rows`, encoded image) for rows (columns file, row_group, group_row), reading each row
    group's image column once, in file and group order: only one row group's images are held at a time.
    A row group or image that cannot be read is recorded in `failures` (stage "image") and skipped."""
    order = rows.sort_values(["file", "row_group", "group_row"], kind="stable")
    for (file, group), part in order.groupby(["file", "row_group"], sort=False):
        try:
            cells = read_row_group(root, file, int(group), [image_column], storage=storage)[image_column]
        except ItemError as err:
            for k in part.index:
                _record(failures, rows, k, root, err)
            continue
        for k, group_row in zip(part.index, part["group_row"]):
            try:
                yield k, image_bytes(cells.iloc[int(group_row)], images_dir)
            except ItemError as err:
                _record(failures, rows, k, root, err)


def _record(failures, rows: pd.DataFrame, k, root, err: ItemError) -> None:
    if failures is None:
        raise err
    failures.record(row_id(rows.at[k, "file"], int(rows.at[k, "row"])), join(root, rows.at[k, "file"]),
                    "image", err.code, str(err), rows.at[k, "id"] if "id" in rows else None)


def data_uri(data: bytes) -> str:
    """A data: URI for an image part of a chat request: the original bytes when the format is one chat
    APIs take (JPEG, PNG, WebP, GIF), else re-encoded as PNG."""
    import base64

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        mime = IMAGE_MIME.get(image.format or "")
        if mime is None:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            data, mime = out.getvalue(), "image/png"
    except Exception as err:  # noqa: BLE001
        raise ItemError("not_an_image", f"the image does not decode: {decoder_message(err)}") from err
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_bytes(value, images_dir: Path | str | None) -> bytes:
    """The encoded image a cell holds: bytes, {"bytes": ..., "path": ...}, or a path under images_dir."""
    if value is None or (isinstance(value, float) and value != value):
        raise ItemError("not_an_image", "the image cell is null")
    if isinstance(value, dict):
        if not value.get("bytes") and not value.get("path"):
            raise ItemError("not_an_image", "the image cell is null (neither bytes nor a path)")
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        if images_dir is None:
            raise ItemError("missing", f"image path {value!r} given but no images_dir is set")
        try:
            path = resolve_inside(images_dir, value)
        except UnsafePathError as err:
            raise ItemError("unsafe_path", str(err)) from err
        if not path.is_file():
            raise ItemError("missing", f"image file {value!r} not found under {images_dir}")
        return path.read_bytes()
    raise ItemError("not_an_image", f"the image cell holds {type(value).__name__}, not bytes or a path")
