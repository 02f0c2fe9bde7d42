"""Reading `sku_data.json` into image items, with every problem turned into a failure record.

Accepted shapes (see config/README.md):
  - a list of SKU objects: [{"sku_id": "A1", "name": ..., "category": ..., "images": ["a.jpg"]}, ...]
  - an object holding that list under "skus", "items", "products" or "data"
  - an object mapping SKU id -> SKU object ({"A1": {"name": ..., "images": [...]}})
Per SKU, the id is read from sku_id | id | sku | code, the images from images | image_paths |
image_files | image_path | image (a string or a list), the name from name | title.
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
from mlprep.records import RecordsError, first_value, read_records
from mlprep.shardlists import CatalogCache, ShardLists, encode_lines, source_key
from mlprep.sources import LOCATION_COLUMNS, LocatedItem, display_paths, index_dataset, locate
from mlprep.storage import is_remote

ID_KEYS = ("sku_id", "id", "sku", "code")
IMAGE_KEYS = ("images", "image_paths", "image_files", "image_path", "image")
NAME_KEYS = ("name", "title")
LIST_KEYS = ("skus", "items", "products", "data")
ITEM_COLUMNS = ["item_id", "sku_id", "name", "category", "image", "path", "shard"]


def item_id_for(sku_id: str, image: str) -> str:
    """'<sku_id>/<image>', with '%' and '/' in the SKU id escaped (%25, %2F).

    The escaped SKU id holds no '/', so the first '/' always ends it and no SKU id or image path
    can forge another item's id: SKU 'A/B' with image 'c.jpg' is 'A%2FB/c.jpg', SKU 'A' with image
    'B/c.jpg' is 'A/B/c.jpg'. Ids without those characters read as before.
    """
    return sku_id.replace("%", "%25").replace("/", "%2F") + "/" + image


@dataclass(frozen=True)
class ImageItem(LocatedItem):
    """One (SKU, image) pair: the unit of work of an encode shard."""

    item_id: str
    sku_id: str
    name: str
    category: str
    image: str  # as written in sku_data.json (normalised), relative to images_dir
    path: str  # absolute path of the file, or of the container that holds the image
    shard: int
    member: str = ""  # in a container: the member (tar) or the row's name (parquet); "" for a file
    offset: int = -1
    size: int = -1
    group: int = -1
    stamp: str = ""


# What a shard's list holds per image: what its encode job needs and where its bytes lie (mlprep.sources: the
# file, or the container, member, offset, size and row group), with a stamp (a file's mtime, a container's size
# and mtime) so that an edited image or container changes its line and reruns its shard. Not the SKU's name or
# category: renaming a SKU changes only the merged metadata, it does not re-encode anything.
LIST_COLUMNS = ["sku_id", "image", *LOCATION_COLUMNS]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # a member a key names, in this order


def shard_list_lines(frame: pd.DataFrame) -> list[str]:
    kinds = {"offset": "int", "size": "int", "group": "int"}
    return encode_lines({c: (kinds.get(c, "str"), frame[c]) for c in LIST_COLUMNS})


def items_from_list(rows: list[dict], shard: int) -> list[ImageItem]:
    """The encode job's items, from its shard list (list_rows)."""
    return [ImageItem(item_id_for(r["sku_id"], r["image"]), r["sku_id"], "", "", r["image"], r["path"], shard,
                      r["member"], r["offset"], r["size"], r["group"], r["stamp"]) for r in rows]


@dataclass(frozen=True)
class Catalog:
    frame: pd.DataFrame  # valid images in sku_data.json order: ITEM_COLUMNS + listed + LOCATION_COLUMNS
    failures: list[Failure]

    @cached_property
    def items(self) -> list[ImageItem]:
        """The valid images, sorted by item id."""
        frame = self.frame.sort_values("item_id", kind="stable")
        return [ImageItem(*row) for row in frame[[*ITEM_COLUMNS, *LOCATION_COLUMNS[1:]]].itertuples(index=False)]

    def items_frame(self) -> pd.DataFrame:
        """The manifest, sorted by item id: ITEM_COLUMNS and `listed`, each image's position among the
        valid images of sku_data.json (first = 0)."""
        frame = self.frame[[*ITEM_COLUMNS, "listed"]].sort_values("item_id", kind="stable")
        return frame.assign(path=display_paths(self.frame)).reset_index(drop=True)


@dataclass(frozen=True)
class ParsedCatalog:
    """What sku_data.json says, before any image file is looked at (cacheable while the file is unchanged)."""

    candidates: pd.DataFrame  # ITEM_COLUMNS, in sku_data.json order; paths not yet checked
    failures: list[Failure]  # SKU-level problems and unsafe paths


def _as_list(images) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def parse_catalog(sku_data: Path | str, images_dir: Path | str, n_shards: int) -> ParsedCatalog:
    """Every (SKU, image) sku_data.json names, with ids, paths and shards; SKU-level problems and unsafe
    paths become failures. One pass in Python per SKU record; everything per image is done on whole
    columns."""
    sku_data = Path(sku_data)
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in ITEM_COLUMNS}).astype({"shard": "int64"})
    failures: list[Failure] = []
    try:
        records = read_records(sku_data, LIST_KEYS)
    except RecordsError as err:
        return ParsedCatalog(empty, [Failure("", str(sku_data), "manifest", "unreadable_list", str(err))])
    if not records:
        return ParsedCatalog(empty, [Failure("", str(sku_data), "manifest", "empty_list", "SKU file holds no SKUs")])

    skus, names, categories, image_lists = [], [], [], []
    first_entry: dict[str, int] = {}
    for position, (key_id, record) in enumerate(records):
        where = f"{sku_data}#{position}"
        if not isinstance(record, dict):
            reason = f"SKU entry is {type(record).__name__}, not an object"
            failures.append(Failure("", where, "manifest", "bad_record", reason))
            continue
        sku_id = key_id if key_id is not None else first_value(record, ID_KEYS)
        if sku_id is None or str(sku_id).strip() == "":
            reason = f"SKU has no id (looked for {', '.join(ID_KEYS)})"
            failures.append(Failure("", where, "manifest", "bad_record", reason))
            continue
        sku_id = str(sku_id).strip()
        if sku_id in first_entry:
            reason = f"duplicate SKU id; the first entry is kept (entry #{first_entry[sku_id]})"
            failures.append(Failure(sku_id, where, "manifest", "duplicate_id", reason))
            continue
        first_entry[sku_id] = position
        images = first_value(record, IMAGE_KEYS)
        if not images:
            failures.append(Failure(sku_id, where, "manifest", "no_images", "SKU has no images"))
            continue
        skus.append(sku_id)
        names.append(str(first_value(record, NAME_KEYS) or ""))
        categories.append(str(record.get("category") or ""))
        image_lists.append(_as_list(images))

    counts = np.fromiter((len(x) for x in image_lists), dtype=np.int64, count=len(image_lists))
    owner = np.repeat(np.arange(len(skus)), counts)
    frame = pd.DataFrame({
        "sku_id": np.asarray(skus, dtype=object)[owner] if len(skus) else np.zeros(0, dtype=object),
        "image": normalise_paths([str(i) for images in image_lists for i in images]),
        "owner": owner,
    }).drop_duplicates(["sku_id", "image"]).reset_index(drop=True)  # one item per file per SKU, order kept
    escaped = frame["sku_id"].str.replace("%", "%25", regex=False).str.replace("/", "%2F", regex=False)
    frame["item_id"] = escaped + "/" + frame["image"]

    root = Path(images_dir).resolve()
    unsafe = unsafe_path_reasons(frame["image"].tolist(), root)
    for position, reason in unsafe:
        row = frame.iloc[position]
        failures.append(Failure(row["item_id"], row["image"], "manifest", "unsafe_path", reason))
    frame = frame.drop(index=[p for p, _ in unsafe]).reset_index(drop=True)
    frame["path"] = f"{root}/" + frame["image"]
    owners = frame["owner"].to_numpy()
    frame["name"] = np.asarray(names, dtype=object)[owners] if len(frame) else frame["image"]
    frame["category"] = np.asarray(categories, dtype=object)[owners] if len(frame) else frame["image"]
    frame["shard"] = shards_of(frame["item_id"].tolist(), n_shards)
    return ParsedCatalog(frame[ITEM_COLUMNS], failures)


@dataclass(frozen=True)
class Source:
    """Where the images lie: `images_dir` and its `input_format` (mlprep.sources), with the parquet settings."""

    images_dir: str
    input_format: str = "files"
    parquet_column: str = "auto"
    parquet_key: str = "auto"
    storage: dict | None = None  # object_storage settings, for an s3:// images_dir (mlprep.storage)

    @classmethod
    def of(cls, source: Source | Path | str) -> Source:
        """A Source, or a folder of image files."""
        return source if isinstance(source, Source) else cls(str(source))


class Located:
    """Where the candidates lie (`frame()`: LOCATION_COLUMNS per candidate), the containers' problems, and
    `stats`, which changes when any input changes: one stat per image for files; for containers, one per
    container (mlprep.sources.index_dataset), and the candidates are looked up only when `frame()` is asked for."""

    def __init__(self, parsed: ParsedCatalog, source: Source, cache_folder: Path | str | None):
        self.parsed, self.problems, self._frame = parsed, [], None
        if source.input_format == "files" and is_remote(source.images_dir):
            raise InputError(f"sku_index.images_dir: {source.images_dir} is in object storage, where images are read "
                             f"from containers: set input_format to webdataset or parquet (docs/your-data.md)")
        if source.input_format == "files":
            size, mtime = file_stats(parsed.candidates["path"].tolist())
            self._frame = pd.DataFrame({"path": parsed.candidates["path"].to_numpy(), "member": "",
                                        "offset": np.int64(-1), "size": size, "group": np.int64(-1),
                                        "stamp": mtime.astype(str)})
            self.stats = np.stack([size, mtime], axis=1)
        else:
            self.index = index_dataset(source.images_dir, source.input_format, cache_folder, source.parquet_column,
                                       source.parquet_key, source.storage)
            self.problems, self.stats = self.index.problems, self.index.stats()

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = locate(self.index, self.parsed.candidates["image"].tolist(), IMAGE_EXTS)
        return self._frame


def check_files(where: Located, n_shards: int) -> Catalog:
    """The catalog, given each candidate's location (size -1: not found). A parquet row is read with its row
    group, so an item in a row group goes to the row group's shard (`<file>#<group>` hashed) and a job reads
    each of its row groups whole once; files and tar members keep the shard of their item id."""
    parsed, located = where.parsed, where.frame()
    frame = parsed.candidates.drop(columns="path").assign(**{c: located[c].to_numpy() for c in LOCATION_COLUMNS})
    missing = (frame["size"] < 0).to_numpy()
    failures = list(parsed.failures) + list(where.problems)
    in_container = frame["path"] == ""  # where a container was searched (mlprep.sources.locate)
    for item_id, image, path, contained in zip(frame["item_id"][missing], frame["image"][missing],
                                               parsed.candidates["path"][missing], in_container[missing]):
        reason = "no container member or key of that name" if contained else "image file not found"
        failures.append(Failure(item_id, image if contained else path, "manifest", "missing", reason))
    frame = frame[~missing].reset_index(drop=True)
    grouped = (frame["group"] >= 0).to_numpy()
    if grouped.any():
        units = (frame["path"][grouped] + "#" + frame["group"][grouped].astype(str)).tolist()
        frame.loc[grouped, "shard"] = shards_of(units, n_shards)
    frame["listed"] = np.arange(len(frame), dtype=np.int64)
    return Catalog(frame[[*ITEM_COLUMNS, "listed", *LOCATION_COLUMNS[1:]]], failures)


def read_catalog(sku_data: Path | str, source: Source | Path | str, n_shards: int,
                 cache_folder: Path | str | None = None) -> Catalog:
    """List every (SKU, image) item; anything wrong becomes a failure, nothing is dropped silently. `source` is a
    Source or a folder of image files; containers' indexes are cached in `cache_folder` (needed for them)."""
    source = Source.of(source)
    parsed = parse_catalog(sku_data, source.images_dir, n_shards)
    return check_files(Located(parsed, source, cache_folder), n_shards)


def count_images(sku_data: Path | str) -> int:
    """How many images sku_data.json lists, before any check (what items_per_shard sizes shards by)."""
    try:
        records = read_records(sku_data, LIST_KEYS)
    except RecordsError:
        return 0
    n = 0
    for _, record in records:
        if isinstance(record, dict):
            images = first_value(record, IMAGE_KEYS)
            n += len(images) if isinstance(images, (list, tuple)) else int(images is not None)
    return n


def cached_parse(sku_data: Path | str, images_dir: Path | str, n_shards: int, folder: Path | str):
    """parse_catalog, through the catalog cache in `folder` (the shard lists' folder)."""
    cache = CatalogCache(folder, {"sku_data": source_key(sku_data), "images_dir": str(Path(images_dir).resolve()),
                                  "shards": n_shards})
    hit = cache.load()
    if hit is not None:
        candidates, failures = hit
        return ParsedCatalog(candidates, [Failure(**row) for row in failures.to_dict("records")]), cache
    parsed = parse_catalog(sku_data, images_dir, n_shards)
    cache.save(parsed.candidates, failures_frame(parsed.failures), "sku.catalog")
    return parsed, cache


def load_catalog(sku_data: Path | str, source: Source | Path | str, n_shards: int, folder: Path | str) -> Catalog:
    """read_catalog through the cache: what the manifest job uses."""
    source = Source.of(source)
    parsed, _ = cached_parse(sku_data, source.images_dir, n_shards, folder)
    return check_files(Located(parsed, source, folder), n_shards)


def sync_lists(sku_data: Path | str, source: Source | Path | str, lists: ShardLists) -> dict[str, str]:
    """Bring the shard lists in step with the catalog and its files; return shard -> fingerprint.

    When neither sku_data.json nor any image's (or container's) size or mtime changed since the last sync,
    nothing is written: the cost is one stat per image file, or one per container."""
    source = Source.of(source)
    parsed, cache = cached_parse(sku_data, source.images_dir, len(lists.names), lists.folder)
    where = Located(parsed, source, lists.folder)
    if cache.same_stats(where.stats) and lists.complete():
        return lists.fingerprints()
    catalog = check_files(where, len(lists.names))
    lists.sync(catalog.frame["shard"].to_numpy(), shard_list_lines(catalog.frame))
    cache.save_stats(where.stats)
    return lists.fingerprints()


def sync_lists_from(source: dict, sku_data: str, folder: str, shards: list[str]) -> None:
    """sync_lists from plain arguments (what mlprep.shardlists.ListSync passes to its process)."""
    sync_lists(sku_data, Source(**source), ShardLists(folder, shards, LIST_COLUMNS))
