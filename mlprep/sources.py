"""Where an item's bytes come from: a file in a folder, a member of a webdataset tar, or a cell of a parquet file.

A data set (`input_format` in the config) is one of:
  files       a folder of files, one per item (an item is named by its path under the folder)
  webdataset  a folder of uncompressed tars (`*.tar`, the img2dataset / video2dataset layout): an item is named by
              its member's name (`000123.jpg`) or by its key (`000123`, the member with a media extension)
  parquet     a folder of parquet files with the bytes in a column (`jpg`, `image`, a `{bytes, path}` struct as
              Hugging Face datasets write it): an item is named by the `key` column, else by the struct's `path`

The container is the unit: the index (`index_dataset`) reads each tar's headers and each parquet file's footer and
name column once, caches them per container (size and mtime; an object's ETag), and so costs one stat per container
(one listing request per thousand objects) on a rerun, never one per item. A located item is (path of its file or container, member, offset, size, group, stamp): a job reads
its bytes with one positioned read (tars) or from its row group (parquet), and `stamp` (the container's size and
mtime when indexed) lets the job tell a container that changed since from the one indexed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.containers import ContainerError, Member, index_tar, read_member, split_key
from mlprep.failures import Failure, ItemError
from mlprep.storage import RangedObject, filesystem, is_remote, list_objects, object_stamp, strip_scheme

log = logging.getLogger(__name__)

FORMATS = ("files", "webdataset", "parquet")
SUFFIXES = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")  # what `column: auto` looks for, in this order
AUDIO_COLUMNS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "webm", "audio")
VIDEO_COLUMNS = ("mp4", "video")
GENERIC_COLUMNS = ("image", "img", "audio", "video", "bytes")  # names that say nothing of the format
KEY_COLUMNS = ("key", "id")
SIDECAR_EXTS = ("json", "txt")  # a sample's metadata members in a tar (webdataset's `{key}.json`, `{key}.txt`)
INDEX_COLUMNS = ["name", "key", "ext", "container", "offset", "size", "group", "meta"]
LOCATION_COLUMNS = ["path", "member", "offset", "size", "group", "stamp"]
CACHE_VERSION = 2
SIDECAR_GAP = 1 << 20  # remote sidecars closer than this are read in one ranged GET
REMOTE_WINDOW = 8 << 20  # a remote tar's headers are read in ranged GETs of this size (one GET for many members)


# ---------------------------------------------------------------- containers of a data set


def container_files(root: Path | str, fmt: str) -> list[Path]:
    """Every `*.tar` or `*.parquet` under root, sorted, hidden files and folders skipped."""
    root = Path(root)
    suffix = SUFFIXES[fmt]
    return [p for p in sorted(root.rglob(f"*{suffix}"))
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def parquet_files(root: Path | str) -> list[Path]:
    return container_files(root, "parquet")


def row_counts(handle) -> list[int]:
    """Rows per row group of an open parquet file, from its footer."""
    meta = handle.metadata
    return [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]


def group_rows(path: Path | str) -> list[int]:
    """Rows per row group, from the footer (raises on an unreadable file)."""
    import pyarrow.parquet as pq

    return row_counts(pq.ParquetFile(path))


def dataset_files(root: Path | str, fmt: str, storage: dict | None = None) -> tuple[str, dict[str, dict]]:
    """(root as a string: an absolute folder or an s3:// URL, {name under root: {size, stamp}}) of every `*.tar` or
    `*.parquet` of a data set, sorted: one stat per local file, listing requests only for a bucket."""
    if is_remote(root):
        root = str(root).rstrip("/")
        return root, list_objects(root, SUFFIXES[fmt], storage)
    folder = Path(root).resolve()
    listed = {}
    for path in container_files(folder, fmt):
        st = path.stat()
        listed[str(path.relative_to(folder))] = {"size": st.st_size, "stamp": stamp_of(st.st_size, st.st_mtime_ns)}
    return str(folder), listed


def join(root: str, name: str) -> str:
    """A file of a data set: `root/name`, for a folder or an s3:// URL alike."""
    return f"{str(root).rstrip('/')}/{name}"


def stamp_of(size: int, mtime_ns: int) -> str:
    return f"{int(size)}-{int(mtime_ns)}"


def cell_bytes(value) -> bytes:
    """The bytes a parquet cell holds: raw bytes, or the `bytes` of a {bytes, path} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None or (isinstance(value, float) and value != value):
        raise ItemError("not_an_image", "the cell holds no bytes (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ItemError("not_an_image", f"the cell holds {type(value).__name__}, not bytes")


def bytes_column(schema, column: str, candidates: tuple[str, ...] = IMAGE_COLUMNS) -> str:
    """The column that holds the bytes (`column`, or the first of `candidates` when 'auto'); raises KeyError."""
    names = schema.names
    if column != "auto":
        if column not in names:
            raise KeyError(f"no column {column!r} (it has {', '.join(names)})")
        return column
    for name in candidates:
        if name in names:
            return name
    raise KeyError(f"no bytes column: looked for {', '.join(candidates)} (it has {', '.join(names)})")


def _meta_text(fields: dict) -> str:
    """A sample's metadata as stored in the index: compact JSON of the fields asked for, "" when none."""
    return json.dumps(fields, ensure_ascii=False, sort_keys=True) if fields else ""


def sample_meta(text: str) -> dict:
    """The fields an index's `meta` column holds for one item ({} for none)."""
    return json.loads(text) if text else {}


def _parquet_members(path: str, column: str, key: str, storage=None, size: int | None = None,
                     candidates: tuple[str, ...] = IMAGE_COLUMNS, meta_fields: tuple[str, ...] = ()) -> pd.DataFrame:
    """(name, key, ext, offset = row, size = -1, group, meta) for every row of a parquet file (KeyError without its
    bytes column or a name for the rows); `meta` holds the row's values of the `meta_fields` columns it has."""
    import pyarrow as pa

    handle = open_parquet(path, storage, size)
    schema = handle.schema_arrow
    data = bytes_column(schema, column, candidates)
    if key == "auto":
        key = next((k for k in KEY_COLUMNS if k in schema.names), None)
        if key is None and pa.types.is_struct(schema.field(data).type) and \
                schema.field(data).type.get_field_index("path") >= 0:
            key = f"{data}.path"
        if key is None:
            raise KeyError(f"no name for the rows: no {' or '.join(KEY_COLUMNS)} column and no {data}.path")
    elif key not in schema.names:
        raise KeyError(f"no key column {key!r} (it has {', '.join(schema.names)})")
    names = handle.read(columns=[key]).column(0)
    if pa.types.is_struct(names.type):
        names = names.combine_chunks().field(0)
    names = pd.Series([None if v is None else str(v) for v in names.to_pylist()], dtype=object)
    counts = row_counts(handle)
    groups = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    ext = "" if data in GENERIC_COLUMNS else data
    present = [f for f in meta_fields if f in schema.names and f != data and f != key]
    if present:
        values = handle.read(columns=present).to_pydict()
        meta = [_meta_text({f: values[f][row] for f in present if values[f][row] is not None})
                for row in range(len(names))]
    else:
        meta = ""
    frame = pd.DataFrame({"name": names, "key": names, "ext": ext,
                          "offset": np.arange(len(names), dtype=np.int64), "size": -1, "group": groups,
                          "meta": meta})
    return frame


@dataclass
class DatasetIndex:
    """Every item of a data set's containers (INDEX_COLUMNS, `container` relative to root), and its problems."""

    root: str  # a local folder (absolute) or an s3:// URL
    fmt: str
    frame: pd.DataFrame
    stamps: dict[str, str]  # container -> stamp
    problems: list[Failure] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what the index was made with (folder, format, column, key)

    def stats(self) -> np.ndarray:
        """What changes when any container or setting changes (the lists' fast path compares it)."""
        text = json.dumps([self.settings, sorted(self.stamps.items())], sort_keys=True)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def _problem(root: str, container: str, member: str | None, code: str, reason: str) -> Failure:
    return Failure("", display_path(f"{root}/{container}", member or ""), "manifest", code, reason)


def _index_tar(path: str, size: int, storage):
    if not is_remote(path):
        return index_tar(path)
    fs, key = filesystem(storage), strip_scheme(path)

    def pread(n: int, offset: int) -> bytes:
        return fs.cat_file(key, start=offset, end=min(offset + n, size))

    try:
        return index_tar(path, pread, size, REMOTE_WINDOW)
    except OSError as err:  # vanished or unreadable while it was being indexed
        raise ContainerError(f"{path}: cannot be read: {err}") from err


def open_parquet(path: str, storage=None, size: int | None = None):
    """A parquet file's footer, local or remote (each read of a remote one a ranged GET of just its bytes)."""
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.ParquetFile(path)
    fs, key = filesystem(storage), strip_scheme(path)
    if size is None:
        size = fs.info(key)["size"]
    return pq.ParquetFile(RangedObject(fs, key, size))


def _read_ranges(path: str, spans: list[tuple[int, int]], storage) -> list[bytes]:
    """The bytes of each (offset, size) span of a container: positioned reads of a local file, or ranged GETs of an
    object, spans less than SIDECAR_GAP apart read in one."""
    if not is_remote(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, size, offset) for offset, size in spans]
        finally:
            os.close(fd)
    fs, key, out = filesystem(storage), strip_scheme(path), []
    k = 0
    while k < len(spans):
        start, end, last = spans[k][0], spans[k][0] + spans[k][1], k
        while last + 1 < len(spans) and spans[last + 1][0] - end < SIDECAR_GAP:
            last += 1
            end = spans[last][0] + spans[last][1]
        data = fs.cat_file(key, start=start, end=end)
        out += [data[o - start : o - start + n] for o, n in spans[k : last + 1]]
        k = last + 1
    return out


def _tar_meta(root: str, container: str, members: list[Member], meta_fields: tuple[str, ...], storage):
    """key -> the `meta_fields` its sample's `{key}.json` (an object) and `{key}.txt` (field `txt`) give, and a
    problem for each sidecar that does not parse."""
    path = f"{root}/{container}"
    sidecars = [m for m in members if m.ext in SIDECAR_EXTS]
    fields: dict[str, dict] = {}
    problems = []
    if not sidecars or not meta_fields:
        return fields, problems
    try:
        texts = _read_ranges(path, [(m.offset, m.size) for m in sidecars], storage)
    except OSError as err:
        raise ContainerError(f"{path}: cannot be read: {err}") from err
    for member, data in zip(sidecars, texts):
        sample = fields.setdefault(member.key, {})
        try:
            text = data.decode("utf-8")
            if member.ext == "txt":
                if "txt" in meta_fields:
                    sample["txt"] = text.strip()
                continue
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(f"a JSON {type(value).__name__}, not an object")
        except ValueError as err:
            problems.append(_problem(root, container, member.name, "bad_record", f"{path}: {member.name!r} does not "
                                                                                  f"parse: {err}"))
            continue
        sample.update({f: value[f] for f in meta_fields if f in value and value[f] is not None and f not in sample})
    return fields, problems


def _index_one(root: str, container: str, fmt: str, column: str, key: str, size: int, storage=None,
               candidates: tuple[str, ...] = IMAGE_COLUMNS, meta_fields: tuple[str, ...] = ()):
    """(members frame, or None when the container cannot be indexed, and its problems) of one container."""
    path = f"{root}/{container}"
    if fmt == "webdataset":
        try:
            members, problems = _index_tar(path, size, storage)
            meta, bad = _tar_meta(root, container, members, meta_fields, storage)
        except ContainerError as err:
            return None, [_problem(root, container, None, "bad_container", str(err))]
        frame = pd.DataFrame({
            "name": [m.name for m in members], "key": [m.key for m in members], "ext": [m.ext for m in members],
            "offset": np.fromiter((m.offset for m in members), np.int64, len(members)),
            "size": np.fromiter((m.size for m in members), np.int64, len(members)), "group": -1,
            "meta": [_meta_text(meta.get(m.key, {})) for m in members] if meta else "",
        })
        return frame, [_problem(root, container, p.member, p.reason_code, p.reason) for p in problems] + bad
    try:
        frame = _parquet_members(path, column, key, storage, size, candidates, meta_fields)
    except KeyError as err:
        return None, [_problem(root, container, None, "missing_column", f"{path}: {err.args[0]}")]
    except Exception as err:  # noqa: BLE001 - any footer error is this file's problem
        return None, [_problem(root, container, None, "bad_container", f"{path}: not a readable parquet file: "
                                                                       f"{err}")]
    unnamed = frame["name"].isna()
    problems = [_problem(root, container, f"row {row}", "unkeyed_member", f"{path}: row {row} has no name")
                for row in frame["offset"][unnamed]]
    return frame[~unnamed].reset_index(drop=True), problems


def index_dataset(root: Path | str, fmt: str, cache_folder: Path | str | None, column: str = "auto",
                  key: str = "auto", storage: dict | None = None, candidates: tuple[str, ...] = IMAGE_COLUMNS,
                  meta_fields: tuple[str, ...] = ()) -> DatasetIndex:
    """The items of every container under root (a folder, or an s3:// URL read with `storage`'s settings);
    containers unchanged since the last call (same size and mtime, or ETag) are taken from the cache in
    `cache_folder` (None: no cache) instead of being read again: a rerun over object storage makes listing
    requests only. A parquet file's bytes are in `column` (auto: the first of `candidates` it has); each item's
    `meta` holds the `meta_fields` its sample's `.json` / `.txt` members (tars) or its row's columns (parquet)
    give, read once with the index."""
    from mlprep.io import atomic_path, write_json

    if not is_remote(root) and not Path(root).resolve().is_dir():
        raise ContainerError(f"{Path(root).resolve()}: the data set's folder does not exist")
    root, listed = dataset_files(root, fmt, storage)
    names = list(listed)
    stamps = {n: info["stamp"] for n, info in listed.items()}
    sizes = {n: info["size"] for n, info in listed.items()}
    cache = Path(cache_folder) / "containers" if cache_folder is not None else None
    settings = {"version": CACHE_VERSION, "root": str(root), "format": fmt, "column": column, "key": key,
                "candidates": list(candidates), "meta": list(meta_fields)}
    old: dict = {}
    try:
        saved = json.loads((cache / "key.json").read_text()) if cache is not None else {}
        if saved.get("settings") == settings:
            old = saved
    except (OSError, ValueError):
        pass
    reuse = {n for n in names if old.get("stamps", {}).get(n) == stamps[n]}
    parts, problems = [], []
    if reuse:
        cached = pd.read_parquet(cache / "members.parquet")
        cached = cached[cached["container"].isin(reuse)]
        parts.append(cached)
        cached_problems = pd.read_parquet(cache / "problems.parquet")
        problems += [Failure(**row) for row in cached_problems[cached_problems["container"].isin(reuse)]
                     .drop(columns="container").to_dict("records")]
    fresh = [n for n in names if n not in reuse]
    fresh_problems = []
    for name in fresh:
        frame, found = _index_one(root, name, fmt, column, key, sizes[name], storage, candidates, meta_fields)
        fresh_problems += [(name, p) for p in found]
        if frame is not None:
            parts.append(frame.assign(container=name)[INDEX_COLUMNS])
    problems += [p for _, p in fresh_problems]
    frame = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame({c: pd.Series(dtype=object) for c in INDEX_COLUMNS}))
    order = {n: k for k, n in enumerate(names)}
    frame = frame.assign(_c=frame["container"].map(order)).sort_values(["_c", "offset"], kind="stable")
    frame = frame.drop(columns="_c").reset_index(drop=True)
    if cache is not None and (fresh or set(old.get("stamps", {})) != set(names)):
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "key.json").unlink(missing_ok=True)
        with atomic_path(cache / "members.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        problem_rows = [{"container": c, **p.__dict__} for c, p in fresh_problems]
        if reuse:
            problem_rows += cached_problems[cached_problems["container"].isin(reuse)].to_dict("records")
        with atomic_path(cache / "problems.parquet") as tmp:
            pd.DataFrame(problem_rows, columns=["container", *Failure.__dataclass_fields__]).to_parquet(tmp, index=False)
        write_json({"settings": settings, "stamps": stamps}, cache / "key.json")
    duplicated = frame["name"].duplicated(keep="first").to_numpy()
    for name, container in zip(frame["name"][duplicated], frame["container"][duplicated]):
        problems.append(_problem(root, container, name, "duplicate_key", f"{root}/{container}: {name!r} is "
                                                                        f"also in an earlier container, which is kept"))
    frame = frame[~duplicated].reset_index(drop=True)
    if not names:
        log.warning("%s: no %s files (input_format: %s)", root, SUFFIXES[fmt], fmt)
    return DatasetIndex(root, fmt, frame, stamps, problems, settings)


def locate(index: DatasetIndex, names: list[str], exts: tuple[str, ...]) -> pd.DataFrame:
    """LOCATION_COLUMNS for each of `names` (size -1 where none matches): a name is a member's own name, or a
    key with a member of one of `exts` (the first of them that the sample has)."""
    frame = index.frame
    positions = pd.Index(frame["name"]).get_indexer(names)
    missing = positions < 0
    if missing.any() and len(frame):
        media = frame[frame["ext"].isin(exts)]
        rank = media["ext"].map({e: k for k, e in enumerate(exts)})
        media = media.assign(_rank=rank).sort_values("_rank", kind="stable").drop_duplicates("key")
        by_key = pd.Series(media.index.to_numpy(), index=media["key"].to_numpy())
        keyed = by_key.reindex(np.asarray(names, dtype=object)[missing]).to_numpy()
        found = ~pd.isna(keyed)
        fill = positions[missing]
        fill[found] = keyed[found].astype(np.int64)
        positions[missing] = fill
    hit = positions >= 0
    rows = frame.iloc[positions[hit]]
    out = pd.DataFrame({"path": "", "member": "", "offset": np.int64(-1), "size": np.int64(-1),
                        "group": np.int64(-1), "stamp": ""}, index=range(len(names)))
    if hit.any():
        out.loc[hit, "path"] = (index.root + "/" + rows["container"]).to_numpy()
        out.loc[hit, "member"] = rows["name"].astype(str).to_numpy()
        out.loc[hit, "offset"] = rows["offset"].to_numpy(np.int64)
        out.loc[hit, "size"] = rows["size"].to_numpy(np.int64)
        out.loc[hit, "group"] = rows["group"].to_numpy(np.int64)
        out.loc[hit, "stamp"] = rows["container"].map(index.stamps).to_numpy()
        if index.fmt == "parquet":  # a size is needed to tell found from missing: the row's, unknown, is 0
            out.loc[hit, "size"] = 0
    return out


def display_path(path: str, member: str) -> str:
    """How a located item is named in failure records and logs: the file, or `<container>#<member>`."""
    return f"{path}#{member}" if member else path


def display_paths(frame: pd.DataFrame) -> pd.Series:
    """display_path of each row of a frame with `path` and `member` columns."""
    return frame["path"].where(frame["member"] == "", frame["path"] + "#" + frame["member"])


def media_key(name: str, exts: tuple[str, ...]) -> str:
    """A parquet row's name without a media extension it may carry (`a.wav` -> `a`): its key, as in a tar."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in exts else name


class LocatedItem:
    """For an item dataclass with fields path, member, offset, size, group and stamp (LOCATION_COLUMNS)."""

    @property
    def location(self) -> tuple:
        """What ItemReader.read takes."""
        return self.path, self.member, self.offset, self.size, self.group, self.stamp

    @property
    def where(self) -> str:
        """The file, or `<container>#<member>`: how failure records name the item."""
        return display_path(self.path, self.member)


# ---------------------------------------------------------------- reading located items in a job


class ItemReader:
    """Reads located items' bytes: files whole, tar members by position (os.pread locally, one ranged GET from
    object storage), parquet cells from their row group.

    Open descriptors, parquet footers and the last few row groups are kept per process (a reader is handed to
    worker processes and starts empty there); each container's stamp is checked once, when it is first opened,
    against what the index saw (a HEAD request for an object)."""

    ROW_GROUPS_KEPT = 4

    def __init__(self, parquet_column: str = "auto", what: str = "file", storage: dict | None = None,
                 candidates: tuple[str, ...] = IMAGE_COLUMNS):
        self.parquet_column, self.what, self.storage, self.candidates = parquet_column, what, storage, candidates
        self._fds: dict[str, int] = {}
        self._checked: dict[str, int] = {}  # object -> its size, once its stamp was checked
        self._tables: dict[str, tuple] = {}  # parquet path -> (file, bytes column, first row of each row group)
        self._groups: OrderedDict = OrderedDict()
        self.bytes_read = 0

    def __getstate__(self):
        return {"parquet_column": self.parquet_column, "what": self.what, "storage": self.storage,
                "candidates": self.candidates}

    def __setstate__(self, state):
        self.__init__(**state)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._checked.clear()
        self._tables.clear()
        self._groups.clear()

    def read(self, path: str, member: str = "", offset: int = -1, size: int = -1, group: int = -1,
             stamp: str = "") -> bytes:
        if not member:
            return read_file(path, self.what)
        if group < 0:
            if is_remote(path):
                data = self._remote_member(path, member, offset, size, stamp)
            else:
                data = read_member(self._tar(path, stamp), Member(member, *split_key(member), offset, size), path)
            self.bytes_read += len(data)
            return data
        return self._cell(path, member, offset, group, stamp)

    @staticmethod
    def _changed(path: str) -> ItemError:
        return ItemError("changed", f"{path}: the container changed after it was indexed (rerun to re-index it)")

    def _check(self, path: str, stamp: str, st: os.stat_result) -> None:
        if stamp and stamp_of(st.st_size, st.st_mtime_ns) != stamp:
            raise self._changed(path)

    def _check_object(self, path: str, stamp: str) -> None:
        if path in self._checked:
            return
        try:
            info = filesystem(self.storage).info(strip_scheme(path), refresh=True)
        except FileNotFoundError as err:
            raise ItemError("missing", f"{path}: the container vanished after it was indexed") from err
        if stamp and object_stamp(info) != stamp:
            raise self._changed(path)
        self._checked[path] = int(info.get("size") or 0)

    def _remote_member(self, path: str, member: str, offset: int, size: int, stamp: str) -> bytes:
        self._check_object(path, stamp)
        try:
            data = filesystem(self.storage).cat_file(strip_scheme(path), start=offset, end=offset + size)
        except FileNotFoundError as err:
            raise ItemError("missing", f"{path}: the container vanished after it was indexed") from err
        except OSError as err:  # throttled or failed through every retry, or unreachable
            raise ItemError("storage_error", f"{path}: member {member!r} cannot be read: {err}") from err
        if len(data) != size:
            raise ItemError("truncated", f"{path}: member {member!r} ends {size - len(data)} bytes short")
        return data

    def _tar(self, path: str, stamp: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as err:
                raise ItemError("missing", f"{path}: the container vanished after it was indexed") from err
            except OSError as err:
                raise ItemError("decode_error", f"{path}: cannot be read: {err}") from err
            try:
                self._check(path, stamp, os.fstat(fd))
            except ItemError:
                os.close(fd)
                raise
            self._fds[path] = fd
        return fd

    def _cell(self, path: str, member: str, row: int, group: int, stamp: str) -> bytes:
        cells = self._groups.get((path, group))
        if cells is None:
            cells = self._read_group(path, group, stamp)
            self._groups[(path, group)] = cells
            while len(self._groups) > self.ROW_GROUPS_KEPT:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end((path, group))
        first, values = cells
        try:
            return cell_bytes(values[row - first])
        except ItemError as err:
            raise ItemError(err.code, f"{path}: row {row} ({member!r}): {err}") from err

    def _read_group(self, path: str, group: int, stamp: str):
        try:
            if path not in self._tables:
                if is_remote(path):
                    self._check_object(path, stamp)
                else:
                    self._check(path, stamp, os.stat(path))
                handle = open_parquet(path, self.storage, self._checked.get(path))
                rows = row_counts(handle)
                self._tables[path] = handle, bytes_column(handle.schema_arrow, self.parquet_column, self.candidates), \
                    np.concatenate([[0], np.cumsum(rows)]).tolist()
            handle, column, firsts = self._tables[path]
            first = firsts[group]
            table = handle.read_row_group(group, columns=[column])
            self.bytes_read += table.nbytes
            return first, table.column(0).to_pylist()
        except FileNotFoundError as err:
            raise ItemError("missing", f"{path}: the container vanished after it was indexed") from err
        except ItemError:
            raise
        except OSError as err:
            if not is_remote(path):
                raise ItemError("bad_row_group", f"{path}: row group {group} cannot be read: {err}") from err
            raise ItemError("storage_error", f"{path}: row group {group} cannot be read: {err}") from err
        except Exception as err:  # noqa: BLE001
            raise ItemError("bad_row_group", f"{path}: row group {group} does not decode: {err}") from err


def read_file(path, what: str = "file") -> bytes:
    """A whole file's bytes; a missing or unreadable one is the item's failure."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ItemError("missing", f"{what} not found") from err
    except OSError as err:
        raise ItemError("decode_error", f"cannot read the file: {err}") from err
