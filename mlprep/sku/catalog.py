"""Reading `sku_data.json` into image items, with every problem turned into a failure record.

Accepted shapes (see config/README.md):
  - a list of SKU objects: [{"sku_id": "A1", "name": ..., "category": ..., "images": ["a.jpg"]}, ...]
  - an object holding that list under "skus", "items", "products" or "data"
  - an object mapping SKU id -> SKU object ({"A1": {"name": ..., "images": [...]}})
Per SKU, the id is read from sku_id | id | sku | code, the images from images | image_paths |
image_files | image_path | image (a string or a list), the name from name | title.
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from mlprep.failures import Failure
from mlprep.ids import UnsafePathError, resolve_inside, shard_of
from mlprep.records import RecordsError, first_value, read_records

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


def _normalised(image: str) -> str:
    """'./a.jpg' and 'x/../a.jpg' name the same file as 'a.jpg': one item, one id."""
    return posixpath.normpath(image) if image else image


@dataclass(frozen=True)
class ImageItem:
    """One (SKU, image) pair: the unit of work of an encode shard."""

    item_id: str
    sku_id: str
    name: str
    category: str
    image: str  # as written in sku_data.json, relative to images_dir
    path: str  # resolved absolute path
    shard: int


@dataclass(frozen=True)
class Catalog:
    items: list[ImageItem]
    failures: list[Failure]
    listed: dict[str, int] = field(default_factory=dict)  # item id -> position in sku_data.json (first = 0)

    def items_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([asdict(i) for i in self.items], columns=ITEM_COLUMNS)
        frame["listed"] = [self.listed.get(i.item_id, -1) for i in self.items]
        return frame.astype({c: "string" for c in ITEM_COLUMNS if c != "shard"} | {"shard": "int64", "listed": "int64"})

    def shard_items(self, shard: int) -> list[ImageItem]:
        return [i for i in self.items if i.shard == shard]


def read_catalog(sku_data: Path | str, images_dir: Path | str, n_shards: int) -> Catalog:
    """List every (SKU, image) item; anything wrong becomes a failure, nothing is dropped silently."""
    sku_data = Path(sku_data)
    failures: list[Failure] = []
    try:
        records = read_records(sku_data, LIST_KEYS)
    except RecordsError as err:
        return Catalog([], [Failure("", str(sku_data), "manifest", "unreadable_list", str(err))])
    if not records:
        return Catalog([], [Failure("", str(sku_data), "manifest", "empty_list", "SKU file holds no SKUs")])

    items: list[ImageItem] = []
    listed: dict[str, int] = {}
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
        images = [images] if isinstance(images, str) else images
        if not images:
            failures.append(Failure(sku_id, where, "manifest", "no_images", "SKU has no images"))
            continue
        name = str(first_value(record, NAME_KEYS) or "")
        category = str(record.get("category") or "")
        for image in dict.fromkeys(_normalised(str(i)) for i in images):  # keeps order, drops repeats
            item_id = item_id_for(sku_id, image)
            try:
                path = resolve_inside(images_dir, image)
            except UnsafePathError as err:
                failures.append(Failure(item_id, image, "manifest", "unsafe_path", str(err)))
                continue
            if not path.is_file():
                failures.append(Failure(item_id, str(path), "manifest", "missing", "image file not found"))
                continue
            listed[item_id] = len(listed)
            items.append(ImageItem(item_id, sku_id, name, category, image, str(path), shard_of(item_id, n_shards)))
    items.sort(key=lambda i: i.item_id)
    return Catalog(items, failures, listed)
