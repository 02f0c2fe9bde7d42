"""Shop-floor queries: photos of a catalog product as a shopper or a shelf camera takes them, drawn from another
distribution than the index's augmentations (those are what the index was built from; queries from the same family
overstate what a user gets).

A shop-floor query of a catalog photo is, in this order (each step seeded per photo and query):
  - a perspective take: the four corners moved inwards by up to `perspective` of the side (a photo from an angle),
    then a crop of `crop` of the product;
  - light: brightness, contrast and saturation scaled within `light` (shop lighting, white balance);
  - an occlusion: a grey sticker (price tag, hand, shelf edge) over up to `occlusion` of the area, with probability
    `occlusion_prob`;
  - blur (camera shake or focus) of up to `blur` pixels;
  - the resolution scaled by `scale` (a phone photo of a far shelf), then saved as a JPEG of `jpeg_quality`.

Making one costs a reader ~35 ms of CPU and its local features ~13 ms more (a 640x480 photo, one core of a Xeon;
the photo's own local features ~34 ms beside ~1-2 ms for all its views), and the eval re-ranks each one: past
`max_queries` catalog photos only a seeded sample of the photos gets queries (`sample_share`, `takes_queries`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from mlprep.rng import rng_for


@dataclass(frozen=True)
class ShopFloor:
    queries_per_image: int = 1
    perspective: float = 0.18
    crop: tuple[float, float] = (0.7, 1.0)
    light: float = 0.35
    occlusion: float = 0.2
    occlusion_prob: float = 0.6
    blur: float = 1.5
    scale: tuple[float, float] = (0.4, 0.6)
    jpeg_quality: tuple[int, int] = (50, 85)
    max_queries: int | None = 2000

    @classmethod
    def from_config(cls, cfg: dict | None) -> ShopFloor:
        from mlprep.config import settings_from_config

        return settings_from_config(cls, cfg, "sku_index.eval.shop_floor", ("crop", "scale", "jpeg_quality"))


def sample_share(n_photos: int, max_queries: int | None) -> float:
    """The share of a catalog's photos that get shop-floor queries: all of them up to `max_queries` photos (None:
    no limit), else the largest power-of-two share 1/2^k that keeps them at most `max_queries` (on average: a
    seeded draw per photo). A power of two, as items_per_shard's shard count is, so that a catalog that grows only
    reruns its shard jobs for this when it doubles past the limit."""
    if not max_queries or n_photos <= max_queries:
        return 1.0
    return 0.5 ** math.ceil(math.log2(n_photos / max_queries))


def takes_queries(seed: int, item_id: str, share: float) -> bool:
    """Whether the photo `item_id` gets shop-floor queries at `share`: a draw of its own, so the same photos
    whatever the shard split, the order or the rest of the catalog; at a share half as big, a subset of them."""
    if share >= 1:
        return True
    return rng_for(seed, "sku-shop-floor-sample", item_id).random() < share


def photo_for_queries(data: bytes, max_side: int = 1024) -> Image.Image:
    """A catalog photo's bytes -> the RGB image shop-floor queries are made from (EXIF orientation applied; a large
    JPEG decoded at reduced size: queries are smaller than the photo anyway)."""
    from mlprep.views import decode_within

    return decode_within(data, "RGB", max_side, Image.LANCZOS)


def shop_floor_query(image: Image.Image, settings: ShopFloor, seed: int, key: str, k: int) -> bytes:
    """Query `k` of a catalog photo (`key` names it), as JPEG bytes."""
    rng = rng_for(seed, "sku-shop-floor", key, k)
    img = image.convert("RGB")
    width, height = img.size
    p = settings.perspective
    # where the output's corners come from in the photo: moved inwards, unevenly (a view from an angle)
    # PIL's QUAD order: upper left, lower left, lower right, upper right
    corners = np.array([[0, 0], [0, height], [width, height], [width, 0]], dtype=np.float64)
    inward = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=np.float64)
    corners += inward * rng.uniform(0, p, size=(4, 2)) * [width, height]
    crop = rng.uniform(*settings.crop)
    centre = corners.mean(axis=0)
    corners = centre + (corners - centre) * crop
    out_size = (width, height)
    img = img.transform(out_size, Image.QUAD, tuple(corners.reshape(-1)), resample=Image.BICUBIC)
    light = settings.light
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - light, 1 + light * 0.6))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - light, 1 + light * 0.6))
    img = ImageEnhance.Color(img).enhance(rng.uniform(1 - light, 1 + light))
    if rng.uniform() < settings.occlusion_prob and settings.occlusion > 0:
        area = rng.uniform(0.5, 1.0) * settings.occlusion * width * height
        aspect = rng.uniform(0.5, 2.0)
        w = min(width, int(np.sqrt(area * aspect)))
        h = min(height, int(area / max(w, 1)))
        x0, y0 = int(rng.uniform(0, width - w)), int(rng.uniform(0, height - h))
        grey = int(rng.integers(90, 200))
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + w, y0 + h], fill=(grey, grey, grey))
    if settings.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, settings.blur)))
    factor = rng.uniform(*settings.scale)
    img = img.resize((max(16, round(width * factor)), max(16, round(height * factor))), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=int(rng.integers(settings.jpeg_quality[0], settings.jpeg_quality[1] + 1)))
    return out.getvalue()
