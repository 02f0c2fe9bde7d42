"""Synthetic product photos for the bundled demo and the tests (no data set can be downloaded here).

Each SKU is a product drawn from its own seeded recipe (shape, colours, label text, pattern);
each photo of it is another seeded take: position, scale, tilt, lighting, background.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from mlprep.rng import rng_for

CATEGORIES = ["snacks", "drinks", "dairy", "household", "personal care"]
SHAPES = ["box", "bottle", "can", "pouch"]


def _colour(rng) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(20, 236, size=3))


def product_photo(sku_id: str, take: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    recipe = rng_for(seed, "demo-sku", sku_id)
    shape = SHAPES[int(recipe.integers(len(SHAPES)))]
    body, label, ink = _colour(recipe), _colour(recipe), _colour(recipe)
    stripes = int(recipe.integers(0, 6))
    shot = rng_for(seed, "demo-take", sku_id, take)
    width, height = size
    background = tuple(int(v) for v in shot.integers(150, 250, size=3))
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for y in range(0, height, 40):  # a shelf-like backdrop
        draw.line([(0, y), (width, y)], fill=tuple(max(0, c - 25) for c in background), width=2)
    scale = shot.uniform(0.55, 0.85)
    pw, ph = int(width * scale * (0.45 if shape == "bottle" else 0.6)), int(height * scale)
    x0 = int(shot.uniform(0.05, 0.95) * (width - pw))
    y0 = int(shot.uniform(0.05, 0.95) * (height - ph))
    box = [x0, y0, x0 + pw, y0 + ph]
    if shape == "box":
        draw.rectangle(box, fill=body, outline=ink, width=4)
    elif shape == "bottle":
        draw.rounded_rectangle(box, radius=pw // 3, fill=body)
        draw.rectangle([x0 + pw // 3, y0 - ph // 8, x0 + 2 * pw // 3, y0 + 4], fill=ink)
    elif shape == "can":
        draw.rounded_rectangle(box, radius=pw // 6, fill=body)
        draw.ellipse([x0, y0 - 12, x0 + pw, y0 + 12], fill=ink)
    else:
        draw.polygon([(x0, y0 + ph), (x0 + pw // 10, y0), (x0 + pw - pw // 10, y0), (x0 + pw, y0 + ph)], fill=body)
    for i in range(stripes):
        sy = y0 + ph // 8 + i * ph // 10
        draw.rectangle([x0 + 6, sy, x0 + pw - 6, sy + ph // 30], fill=ink)
    ly = y0 + ph // 2
    draw.rectangle([x0 + 8, ly, x0 + pw - 8, ly + ph // 5], fill=label)
    draw.text((x0 + 14, ly + 6), sku_id.upper(), fill=ink, font_size=max(12, pw // 6))
    img = img.rotate(shot.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=background)
    img = ImageEnhance.Brightness(img).enhance(shot.uniform(0.8, 1.2))
    if shot.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(shot.uniform(0.5, 1.5)))
    return img


def write_catalog(folder: Path | str, n_skus: int, photos_per_sku: int = 2, size=(640, 480), seed: int = 0) -> Path:
    """Write `images/` and `sku_data.json` for `n_skus` synthetic SKUs; returns the JSON's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    skus = []
    for n in range(n_skus):
        sku_id = f"sku{n:04d}"
        images = []
        for take in range(photos_per_sku):
            name = f"{sku_id}_{take}.jpg"
            product_photo(sku_id, take, size, seed).save(folder / "images" / name, quality=85)
            images.append(name)
        skus.append({"sku_id": sku_id, "name": f"Product {n}", "category": CATEGORIES[n % len(CATEGORIES)], "images": images})
    path = folder / "sku_data.json"
    path.write_text(json.dumps(skus, indent=1) + "\n")
    return path
