"""The bundled demo's inputs and the tests' synthetic data (no data set can be downloaded here).

Real photos (resources/demo/photos, CC0 and public domain, SOURCES.md there) make the demo's SKUs and its probe
dataset, so that a real pretrained model has something to recognise: each SKU photo is a seeded take of one
photo (crop, tilt, lighting), each probe image a seeded, sometimes hard, view of one (small crops, greyscale,
blur, low resolution). Synthetic SKUs are drawn from their own seeded recipe (shape, colours, label text,
pattern); each photo of one is another seeded take: position, scale, tilt, lighting, background.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from mlprep.rng import rng_for

CATEGORIES = ["snacks", "drinks", "dairy", "household", "personal care"]
PHOTOS = Path(__file__).resolve().parents[1] / "resources" / "demo" / "photos"
# The demo's real-object SKUs: (photo, name, category)
REAL_SKUS = [("chelsea", "Cat poster", "decor"), ("coffee", "Espresso cup", "kitchen"),
             ("rocket", "Rocket launch print", "decor"), ("astronaut", "Astronaut poster", "decor"),
             ("camera", "Tripod photo print", "decor"), ("brick", "Brick tile", "building"),
             ("gravel", "Gravel, 25 kg", "garden"), ("grass", "Turf roll", "garden"), ("coins", "Coin set", "collectibles"),
             ("clock_motion", "Wall clock", "decor"), ("horse", "Horse decal", "decor"),
             ("grace_hopper", "Portrait print", "decor")]
# The probe demo's labels: an ImageNet-1k class each (probe_qa.probe.classes maps the ambiguous one)
PROBE_PHOTOS = {"chelsea": "tabby", "coffee": "espresso", "rocket": "missile", "camera": "tripod",
                "grace_hopper": "military uniform", "clock_motion": "wall clock", "horse": "sorrel"}
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


def photo_take(photo: str, take: int, size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """Another shot of a real photo: a seeded crop of 65-95% of it at the output's aspect, a small tilt, lighting."""
    rng = rng_for(seed, "demo-photo-take", photo, take)
    with Image.open(PHOTOS / f"{photo}.jpg") as source:
        img = source.convert("RGB")
    aspect = size[0] / size[1]
    width, height = img.size
    crop_w = min(width, height * aspect) * rng.uniform(0.65, 0.95)
    crop_h = crop_w / aspect
    x0, y0 = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    img = img.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC, center=(x0 + crop_w / 2, y0 + crop_h / 2))
    img = img.resize(size, Image.LANCZOS, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))


def write_sku_demo(folder: Path | str, synthetic: int = 4, size=(320, 240), seed: int = 0) -> Path:
    """The bundled SKU demo: the real-object SKUs of REAL_SKUS and `synthetic` drawn ones, two photos each."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    skus = []
    for n, (photo, name, category) in enumerate(REAL_SKUS):
        sku_id = f"sku{n:04d}"
        images = []
        for take in range(2):
            images.append(f"{sku_id}_{take}.jpg")
            photo_take(photo, take, size, seed).save(folder / "images" / images[-1], quality=88)
        skus.append({"sku_id": sku_id, "name": name, "category": category, "images": images})
    drawn = json.loads(write_catalog(folder / "drawn", synthetic, 2, size, seed).read_text())
    for k, entry in enumerate(drawn):
        sku_id = f"sku{len(REAL_SKUS) + k:04d}"
        images = []
        for take, old in enumerate(entry["images"]):
            images.append(f"{sku_id}_{take}.jpg")
            (folder / "drawn" / "images" / old).rename(folder / "images" / images[-1])
        skus.append({**entry, "sku_id": sku_id, "images": images})
    import shutil

    shutil.rmtree(folder / "drawn")
    path = folder / "sku_data.json"
    path.write_text(json.dumps(skus, indent=1) + "\n")
    return path


def _region(photo: str, region: int, regions: int) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A real photo and the box of its `region`-th of `regions` (a grid of overlapping cells): look-alike products
    that share colours, textures and parts with their neighbours."""
    with Image.open(PHOTOS / f"{photo}.jpg") as source:
        img = source.convert("RGB")
    cols = 2 if regions <= 4 else 3
    rows = -(-regions // cols)
    row, col = divmod(region, cols)
    cell_w, cell_h = img.width / cols, img.height / rows
    pad_w, pad_h = cell_w * 0.15, cell_h * 0.15  # neighbours overlap
    box = (max(0.0, col * cell_w - pad_w), max(0.0, row * cell_h - pad_h),
           min(img.width, (col + 1) * cell_w + pad_w), min(img.height, (row + 1) * cell_h + pad_h))
    return img, box


def lookalike_shot(photo: str, region: int, regions: int, take: int, size=(320, 240), seed: int = 0) -> Image.Image:
    """A catalog shot of one look-alike SKU: its region, a seeded crop of 90-100% of it, a small tilt, lighting."""
    rng = rng_for(seed, "lookalike-take", photo, region, take)
    img, (x0, y0, x1, y1) = _region(photo, region, regions)
    w, h = (x1 - x0) * rng.uniform(0.9, 1.0), (y1 - y0) * rng.uniform(0.9, 1.0)
    cx, cy = x0 + rng.uniform(w / 2, x1 - x0 - w / 2), y0 + rng.uniform(h / 2, y1 - y0 - h / 2)
    img = img.rotate(rng.uniform(-4, 4), resample=Image.BICUBIC, center=(cx, cy))
    img = img.resize(size, Image.LANCZOS, box=(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))


def lookalike_product(photo: str, region: int, regions: int, size=(480, 360)) -> Image.Image:
    """The physical product a look-alike SKU stands for: its whole region, as a shop-floor photo would see it."""
    img, box = _region(photo, region, regions)
    return img.resize(size, Image.LANCZOS, box=box)


def lookalike_queries(skus: list[dict], per_sku: int, seed: int) -> list[tuple[str, bytes]]:
    """(SKU id, JPEG bytes): `per_sku` shop-floor photos of each look-alike product of a catalog that
    write_lookalike_catalog wrote (its `sku_data.json` records), taken of the product itself, not of a catalog shot."""
    from mlprep.sku.shopfloor import ShopFloor, shop_floor_query

    out = []
    for sku in skus:
        product = lookalike_product(*sku["source"])
        out += [(sku["sku_id"], shop_floor_query(product, ShopFloor(), seed, sku["sku_id"], k)) for k in range(per_sku)]
    return out


def write_lookalike_catalog(folder: Path | str, photos: list[str] | None = None, regions: int = 4, shots: int = 2,
                            size=(320, 240), seed: int = 0) -> Path:
    """A fine-grained catalog: `regions` SKUs cut from each real photo (neighbouring SKUs share colours, textures
    and parts), `shots` catalog photos each; `sku_data.json` lists them with `source` (photo, region) so that
    shop-floor queries of the same products can be made (mlprep.sku.shopfloor). Returns the JSON's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    photos = photos or [photo for photo, _, _ in REAL_SKUS]
    skus = []
    for photo in photos:
        for region in range(regions):
            sku_id = f"{photo}-{region}"
            images = []
            for take in range(shots):
                images.append(f"{sku_id}_{take}.jpg")
                lookalike_shot(photo, region, regions, take, size, seed).save(folder / "images" / images[-1],
                                                                             quality=90)
            skus.append({"sku_id": sku_id, "name": f"{photo} part {region + 1}", "category": photo,
                         "images": images, "source": [photo, region, regions]})
    path = folder / "sku_data.json"
    path.write_text(json.dumps(skus, indent=1) + "\n")
    return path


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


def write_clip(path: Path | str, seconds: float, fps: int = 25, size: tuple[int, int] = (320, 180),
               gop: int | None = None, source: str = "testsrc", audio_seconds: float | None = None) -> Path:
    """Encode a synthetic H.264 clip with the ffmpeg binary imageio-ffmpeg ships (or $MLPREP_FFMPEG)."""
    import subprocess

    from mlprep.video.decode import ffmpeg_exe

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    video = f"{source}=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}"
    if source.startswith("color"):
        video = f"{source}:size={size[0]}x{size[1]}:rate={fps}:duration={seconds}"
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", video]
    if audio_seconds:
        cmd += ["-f", "lavfi", "-i", f"sine=duration={audio_seconds}", "-c:a", "aac"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    if gop:
        cmd += ["-g", str(gop), "-keyint_min", str(gop)]
    subprocess.run([*cmd, str(path)], check=True)
    return path


def write_video_demo(folder: Path | str) -> Path:
    """A handful of clips (lengths, rates, sizes, a window, one too short for 16 frames) and their pairs."""
    folder = Path(folder)
    clips = [
        ("walk_forest", 4, 25, (320, 180), "testsrc", "a player walks through a forest", None, None),
        ("mine_cave", 6, 30, (426, 240), "testsrc2", "mining iron ore in a cave", 1.0, 5.0),
        ("build_house", 3, 24, (320, 180), "smptebars", "building a wooden house", None, None),
        ("swim_river", 5, 25, (256, 144), "rgbtestsrc", "swimming across a river", None, None),
        ("jump_short", 0.4, 25, (320, 180), "testsrc2", "a quick jump", None, None),
        ("fight_night", 4, 20, (320, 240), "testsrc", "fighting zombies at night", 0.5, None),
        ("farm_wheat", 3, 25, (320, 180), "smptehdbars", "harvesting wheat on a farm", None, None),
        ("boat_sea", 4, 25, (320, 180), "rgbtestsrc", "sailing a boat on the sea", None, None),
    ]
    pairs = []
    for clip_id, seconds, fps, size, source, text, start, end in clips:
        write_clip(folder / "clips" / f"{clip_id}.mp4", seconds, fps, size, gop=fps, source=source)
        pair = {"clip": f"{clip_id}.mp4", "text": text}
        if start is not None:
            pair["start"] = start
        if end is not None:
            pair["end"] = end
        pairs.append(pair)
    path = folder / "train_pairs.json"
    path.write_text(json.dumps(pairs, indent=1) + "\n")
    return path


# Speech demo: speakers are espeak-ng voice variants at different pitches and speeds (a speaker encoder
# tells those apart; one voice in two languages it does not). Made once with `python -m mlprep.demo speech`
# and committed (espeak-ng is a Debian package, not something the tests or CI need).
SPEECH_SPEAKERS = {  # dataset/speaker -> (espeak voice, pitch 0-99, words per minute)
    "studio/alice": ("en-us+f3", 75, 165),
    "studio/bruno": ("en-us+m3", 35, 150),
    "phone/chen": ("en-gb+m7", 55, 130),
    "phone/dana": ("en-us+f5", 92, 190),
}
SPEECH_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call me back when you have finished reading the report.",
    "Seven silver spoons were missing from the kitchen drawer this morning.",
    "We will meet at the station at half past nine tomorrow.",
    "Rain is expected later today, so bring an umbrella with you.",
]


def write_speech_demo(folder: Path | str, rate: int = 16000) -> Path:
    """{dataset}/{speaker}/{utt}.wav at 16 kHz mono; one FLAC and one 44.1 kHz stereo 24-bit file among them."""
    import subprocess
    import tempfile

    import numpy as np
    import soundfile

    from mlprep.speaker.audio import resample

    folder = Path(folder)
    for key, (voice, pitch, speed) in SPEECH_SPEAKERS.items():
        for k, line in enumerate(SPEECH_LINES):
            with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
                subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", tmp.name, line],
                               check=True, capture_output=True)
                samples, source_rate = soundfile.read(tmp.name, dtype="float32")
            out = folder / key / f"utt{k}.wav"
            out.parent.mkdir(parents=True, exist_ok=True)
            if key == "phone/chen" and k == 1:
                soundfile.write(out.with_suffix(".flac"), resample(samples, source_rate, rate), rate)
            elif key == "studio/alice" and k == 2:
                wide = resample(samples, source_rate, 44100)
                soundfile.write(out, np.stack([wide, 0.8 * wide], axis=1), 44100, subtype="PCM_24")
            else:
                soundfile.write(out, resample(samples, source_rate, rate), rate, subtype="PCM_16")
    return folder


def _planted_shape():
    """A 20-bar shape (log-returns: a slide, a base, a breakout) and the 5-bar rise that follows it."""
    import numpy as np

    return np.r_[np.full(6, -0.012), np.full(8, 0.001), np.full(6, 0.009)], np.full(5, 0.008)


def price_series(n_bars: int, seed: int, plants: int = 8, start: str = "2018-01-02"):
    """One symbol's daily OHLCV: a seeded random walk whose drift and volatility switch regime every
    60-250 bars, with `plants` copies of the planted shape (each followed by its rise) at random places."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    returns = np.empty(n_bars)
    at = 0
    while at < n_bars:
        length = int(rng.integers(60, 250))
        drift, vol = rng.normal(0, 0.0008), rng.uniform(0.008, 0.025)
        returns[at : at + length] = rng.normal(drift, vol, min(length, n_bars - at))
        at += length
    shape, rise = _planted_shape()
    span = len(shape) + len(rise)
    slots = np.arange(30, n_bars - span, span + 5)
    starts = np.sort(rng.choice(slots, size=min(plants, len(slots)), replace=False))
    for s in starts:
        returns[s : s + span] = np.r_[shape, rise] + rng.normal(0, 0.002, span)
    close = 20.0 * np.exp(np.cumsum(returns)) * rng.uniform(0.5, 5.0)
    opens = np.r_[close[0], close[:-1]] * np.exp(rng.normal(0, 0.003, n_bars))
    high = np.maximum(opens, close) * np.exp(np.abs(rng.normal(0, 0.006, n_bars)))
    low = np.minimum(opens, close) * np.exp(-np.abs(rng.normal(0, 0.006, n_bars)))
    volume = np.round(rng.lognormal(13, 0.4, n_bars))
    dates = pd.bdate_range(start, periods=n_bars)
    return pd.DataFrame({"date": dates, "open": opens, "high": high, "low": low, "close": close, "volume": volume})


def write_prices_demo(folder: Path | str, n_symbols: int = 32, n_bars: int = 750, seed: int = 11) -> Path:
    """{SYMBOL}.csv (or .parquet) price files in the column spellings users have: Yahoo-style
    (Date, Open, High, Low, Close, Adj Close, Volume), lower case, and a `timestamp` parquet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_symbols):
        frame = price_series(n_bars, seed * 1000 + k)
        symbol = f"S{k:03d}"
        if k % 4 == 0:  # Yahoo's spelling, with an adjusted close
            frame = frame.rename(columns=str.title).assign(**{"Adj Close": lambda f: f["Close"] * 0.98})
            frame = frame[["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]]
            frame.to_csv(folder / f"{symbol}.csv", index=False, float_format="%.4f")
        elif k % 4 == 1:
            frame.rename(columns={"date": "timestamp"}).to_parquet(folder / f"{symbol}.parquet", index=False)
        else:
            frame.to_csv(folder / f"{symbol}.csv", index=False, float_format="%.4f")
    return folder


PROBE_COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40)}


def probe_image(label: str, seed: int, size: int = 96) -> bytes:
    """A PNG of a '<colour> <shape>' (circle, square, triangle) on a noisy background in a seeded pose: tests'
    labelled images."""
    import io

    rng = rng_for(seed, "probe-image", label)
    colour, shape = label.split(" ")
    base = tuple(int(v) for v in rng.integers(90, 200, 3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(6):  # clutter
        x, y = (int(v) for v in rng.integers(0, size, 2))
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    fill = tuple(int(min(255, max(0, c + rng.integers(-30, 30)))) for c in PROBE_COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def probe_photo(photo: str, seed: int) -> bytes:
    """A JPEG view of a real photo as a probe dataset holds it: a crop of 15-100% of it, sometimes greyscale,
    blurred, tilted or small (48-224 px): views a real model gets right, and some it gets wrong."""
    import io

    from PIL import ImageOps

    rng = rng_for(seed, "probe-photo", photo)
    with Image.open(PHOTOS / f"{photo}.jpg") as source:
        img = source.convert("RGB")
    width, height = img.size
    area = rng.uniform(0.15, 1.0)
    w = min(width, width * area ** 0.5 * rng.uniform(0.8, 1.25))
    h = min(height, width * height * area / w)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    img = img.crop((int(x0), int(y0), int(x0 + w), int(y0 + h)))
    if rng.uniform() < 0.25:
        img = img.rotate(rng.uniform(-30, 30), resample=Image.BICUBIC, expand=False)
    if rng.uniform() < 0.2:
        img = ImageOps.grayscale(img).convert("RGB")
    if rng.uniform() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.5)))
    side = int(rng.uniform(48, 224))
    img.thumbnail((side, side), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=int(rng.uniform(60, 92)))
    return out.getvalue()


def write_probe_demo(folder: Path | str, rows: int = 32, seed: int = 5) -> Path:
    """Three parquet files of labelled images (labels: ImageNet classes, PROBE_PHOTOS) in the forms datasets hold
    them: raw bytes (a.parquet), Hugging Face's {bytes, path} struct (b.parquet), and bytes with a broken image
    (c.parquet); 16 rows per row group, and an `id` column of the dataset's own ids."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(PROBE_PHOTOS)
    for k, name in enumerate(["a", "b", "c"]):
        rng = np.random.default_rng(seed + k)
        chosen = [photos[i] for i in rng.integers(0, len(photos), rows)]
        images = [probe_photo(photo, seed * 1000 + k * rows + i) for i, photo in enumerate(chosen)]
        if name == "c":
            images[5] = images[5][:40]  # a truncated JPEG: a failure record, the rest of the file is probed
        column = (pa.array([{"bytes": b, "path": f"{name}/{i:04d}.jpg"} for i, b in enumerate(images)])
                  if name == "b" else pa.array(images, pa.binary()))
        table = pa.table({"id": [f"{name}-{i:04d}" for i in range(rows)], "image": column,
                          "label": [PROBE_PHOTOS[p] for p in chosen], "source": [f"demo-{name}"] * rows})
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=16)
    return folder


ECAPA_HPARAMS = """\
# A speechbrain speaker-encoder folder laid out as the hub's spkrec-ecapa-voxceleb (smaller sizes).
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
n_mels: {n_mels}
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: {channels}
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: {attention}
    lin_neurons: {dim}
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def write_ecapa_model(folder: Path | str, channels: int = 32, dim: int = 24, n_mels: int = 24, seed: int = 0) -> Path:
    """A random-init ECAPA-TDNN model folder (hyperparams.yaml + embedding_model.ckpt) in the layout of the
    hub's speechbrain/spkrec-ecapa-voxceleb, for tests and benchmarks of the speechbrain backend: it loads
    through the real from_hparams path, but random weights carry no speaker identity. channels=1024,
    dim=192, n_mels=80 give the real model's size."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [channels] * 4 + [channels * 3]
    attention = max(8, channels // 8)
    (folder / "hyperparams.yaml").write_text(
        ECAPA_HPARAMS.format(n_mels=n_mels, channels=sizes, attention=attention, dim=dim))
    torch.manual_seed(seed)
    model = ECAPA_TDNN(n_mels, channels=sizes, kernel_sizes=[5, 3, 3, 3, 1], dilations=[1, 2, 3, 4, 1],
                       attention_channels=attention, lin_neurons=dim)
    torch.save(model.state_dict(), folder / "embedding_model.ckpt")
    return folder


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["speech"]:
        print(write_speech_demo(sys.argv[2] if len(sys.argv) > 2 else "resources/demo/speech"))
    elif sys.argv[1:2] == ["prices"]:
        print(write_prices_demo(sys.argv[2] if len(sys.argv) > 2 else "resources/demo/prices"))
    elif sys.argv[1:2] == ["sku"]:
        print(write_sku_demo(sys.argv[2] if len(sys.argv) > 2 else "resources/demo/sku"))
    elif sys.argv[1:2] == ["probe"]:
        print(write_probe_demo(sys.argv[2] if len(sys.argv) > 2 else "resources/demo/probe"))
    elif sys.argv[1:2] == ["ecapa"]:
        print(write_ecapa_model(sys.argv[2] if len(sys.argv) > 2 else "ecapa-random"))


def pack_files(folder: Path | str, out: Path | str, input_format: str, per_container: int = 16,
               key_with_ext: bool = True, struct: bool | str = False) -> list[Path]:
    """The files of `folder` (sorted, recursively) packed into containers under `out`, as the tools that make
    training sets write them: webdataset tars `00000.tar` of `{name}` members beside a `{key}.json` each, or
    parquet files `00000.parquet` with the bytes in a column named after the format (`jpg`, `wav`, ...) and a
    `key` column, or (`struct`) a column of `{bytes, path}` structs as Hugging Face `datasets` writes them, named
    `struct` (True: `image`). `key_with_ext`: a parquet row's key is the file's name (`a.jpg`), else its key (`a`)."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    written = []
    for n, start in enumerate(range(0, len(files), per_container)):
        part = files[start : start + per_container]
        names = [str(p.relative_to(folder)) for p in part]
        if input_format == "webdataset":
            path = out / f"{n:05d}.tar"
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
                for name, file in zip(names, part):
                    archive.add(file, arcname=name)
                    meta = json.dumps({"source": name}).encode()
                    info = tarfile.TarInfo(name.split(".", 1)[0] + ".json")
                    info.size = len(meta)
                    archive.addfile(info, io.BytesIO(meta))
        else:
            path = out / f"{n:05d}.parquet"
            data = [p.read_bytes() for p in part]
            keys = names if key_with_ext else [name.split(".", 1)[0] for name in names]
            if struct:
                cells = pa.array([{"bytes": d, "path": k} for d, k in zip(data, keys)])
                table = pa.table({"image" if struct is True else struct: cells})
            else:
                column = part[0].suffix.lstrip(".").lower() or "bytes"
                table = pa.table({"key": keys, column: pa.array(data, pa.binary())})
            pq.write_table(table, path, row_group_size=max(1, per_container // 4))
        written.append(path)
    return written
