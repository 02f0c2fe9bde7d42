"""Reading `sku_data.json` into image items, with every problem turned into a failure record.

Accepted shapes (see config/README.md):
  - a list of SKU objects: [{"sku_id": "A1", "name": ..., "category": ..., "images": ["a.jpg"]}, ...]
  - an object holding that list under "skus", "items", "products" or "data"
  - an object mapping SKU id -> SKU object ({"A1": {"name": ..., "images": [...]}})
Per SKU, the id is read from sku_id | id | sku | code, the images from images | image_paths |
image_files | image_path | image (a string or a list), the name from name | title.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def items_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([asdict(i) for i in self.items], columns=ITEM_COLUMNS)
        return frame.astype({c: "string" for c in ITEM_COLUMNS if c != "shard"} | {"shard": "int64"})

    def shard_items(self, shard: int) -> list[ImageItem]:
        return [i for i in self.items if i.shard == shard]


def read_catalog(sku_data: Path | str, images_dir: Path | str, n_shards: int) -> Catalog:
    """List every (SKU, image) item; anything wrong becomes a failure, nothing is dropped silently."""
    sku_data = Path(sku_data)
    failures: list[Failure] = []
    try:
        records = read_records(sku_data, LIST_KEYS)
    except RecordsError as err:
        return Catalog([], [Failure("", str(sku_data), "manifest", str(err))])
    if not records:
        return Catalog([], [Failure("", str(sku_data), "manifest", "SKU file holds no SKUs")])

    items: list[ImageItem] = []
    seen_skus: set[str] = set()
    for position, (key_id, record) in enumerate(records):
        where = f"{sku_data}#{position}"
        if not isinstance(record, dict):
            failures.append(Failure("", where, "manifest", f"SKU entry is {type(record).__name__}, not an object"))
            continue
        sku_id = key_id if key_id is not None else first_value(record, ID_KEYS)
        if sku_id is None or str(sku_id).strip() == "":
            failures.append(Failure("", where, "manifest", f"SKU has no id (looked for {', '.join(ID_KEYS)})"))
            continue
        sku_id = str(sku_id).strip()
        if sku_id in seen_skus:
            failures.append(Failure(sku_id, where, "manifest", "duplicate SKU id; the first entry is kept"))
            continue
        seen_skus.add(sku_id)
        images = first_value(record, IMAGE_KEYS)
        images = [images] if isinstance(images, str) else images
        if not images:
            failures.append(Failure(sku_id, where, "manifest", "SKU has no images"))
            continue
        name = str(first_value(record, NAME_KEYS) or "")
        category = str(record.get("category") or "")
        for image in dict.fromkeys(str(i) for i in images):  # keeps order, drops repeats
            item_id = f"{sku_id}/{image}"
            try:
                path = resolve_inside(images_dir, image)
            except UnsafePathError as err:
                failures.append(Failure(item_id, image, "manifest", str(err)))
                continue
            if not path.is_file():
                failures.append(Failure(item_id, str(path), "manifest", "image file not found"))
                continue
            items.append(ImageItem(item_id, sku_id, name, category, image, str(path), shard_of(item_id, n_shards)))
    items.sort(key=lambda i: i.item_id)
    return Catalog(items, failures)
