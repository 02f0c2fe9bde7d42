"""Shop-floor augmentations as numbers: seeded view parameters and the transforms that render them.

Every view is one projective warp (random resized crop + rotation + perspective + flip folded into a
single 3x3 matrix) followed by brightness, contrast, saturation and hue (one 3x3 colour matrix) and an
optional Gaussian blur. The parameters are a pure function of (seed, item id, k) and the image's displayed
size, so a view is the same whichever decoder made the pixels; mlprep.views renders them on the model's
device. View 0 is the plain original (centre square crop), the same view a query image gets at search time.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from mlprep.sources import read_file
from mlprep.rng import rng_for
from mlprep.views import ViewRenderer, ViewTransforms, colour_transforms


@dataclass(frozen=True)
class AugmentSettings:
    crop_scale: tuple[float, float] = (0.3, 1.0)  # measured: bench/sku_descriptors.py, docs/sku_index.md
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    rotation_deg: float = 15.0
    perspective: float = 0.15
    flip_prob: float = 0.0
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    blur_prob: float = 0.0  # blur earned nothing on shop-floor queries (same benchmark)
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    padding_mode: str = "border"

    @classmethod
    def from_config(cls, cfg: dict | None) -> AugmentSettings:
        from mlprep.config import settings_from_config

        cfg = {k: [float(x) for x in v] if k in ("crop_scale", "crop_ratio", "blur_sigma") else v
               for k, v in (cfg or {}).items()}
        return settings_from_config(cls, cfg, "sku_index.augment", ("crop_scale", "crop_ratio", "blur_sigma"))


@dataclass(frozen=True)
class ViewParams:
    """Everything that defines one view; stored with its embedding so a view can be reproduced."""

    view: int
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # x, y, w, h as fractions of the image
    angle: float = 0.0
    corners: tuple[float, ...] = field(default=(0.0,) * 8)  # perspective offsets, fractions of the output
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    blur_sigma: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def as_json(self) -> str:
        """The parameters as the index's `augmentation` column holds them: the same text as
        json.dumps(asdict(self), sort_keys=True), at a third of its cost (asdict copies every field
        recursively): a shard writes one for each of its views."""
        return _PARAMS_JSON.encode({name: getattr(self, name) for name in _PARAM_NAMES})


_PARAM_NAMES = sorted(f.name for f in fields(ViewParams))
_PARAMS_JSON = json.JSONEncoder(sort_keys=True)


def original_view(width: int, height: int) -> ViewParams:
    """The centre square crop: what CLIP's resize + centre-crop preprocessing shows the model."""
    side = min(width, height)
    return ViewParams(0, ((width - side) / 2 / width, (height - side) / 2 / height, side / width, side / height))


# the crops of a query image that a search embeds and averages (sku_index.query_crops): `centre` is view 0, the
# centre square the index holds of every photo; `whole` is the whole photo squeezed into the square, so that what
# the centre crop cuts off a wide or tall shot still counts
QUERY_CROPS = ("centre", "whole")


def query_views(crops, width: int, height: int) -> list[ViewParams]:
    """The views of a query image displayed at width x height, one per crop name."""
    unknown = [c for c in crops if c not in QUERY_CROPS]
    if unknown or not crops:
        raise ValueError(f"sku_index.query_crops: {list(crops)!r} must name one or more of {', '.join(QUERY_CROPS)}")
    return [original_view(width, height) if c == "centre" else ViewParams(0) for c in crops]


def sample_view(settings: AugmentSettings, seed: int, stream: str, item_id: str, k: int, width: int, height: int):
    """One random view, a pure function of (seed, stream, item id, k) and the image's size."""
    rng = rng_for(seed, stream, item_id, k)
    area = width * height
    crop = None
    for _ in range(10):  # random resized crop, as torchvision samples it
        target = area * rng.uniform(*settings.crop_scale)
        ratio = math.exp(rng.uniform(math.log(settings.crop_ratio[0]), math.log(settings.crop_ratio[1])))
        w = math.sqrt(target * ratio)
        h = math.sqrt(target / ratio)
        if 0 < w <= width and 0 < h <= height:
            x = rng.uniform(0, width - w)
            y = rng.uniform(0, height - h)
            crop = (x / width, y / height, w / width, h / height)
            break
    if crop is None:
        crop = original_view(width, height).crop
    d = settings.perspective / 2
    return ViewParams(
        view=k,
        crop=tuple(round(float(v), 6) for v in crop),
        angle=float(rng.uniform(-settings.rotation_deg, settings.rotation_deg)),
        corners=tuple(float(v) for v in rng.uniform(-d, d, size=8)),
        flip=bool(rng.uniform() < settings.flip_prob),
        brightness=float(rng.uniform(1 - settings.brightness, 1 + settings.brightness)),
        contrast=float(rng.uniform(1 - settings.contrast, 1 + settings.contrast)),
        saturation=float(rng.uniform(1 - settings.saturation, 1 + settings.saturation)),
        hue=float(rng.uniform(-settings.hue, settings.hue)),
        blur_sigma=float(rng.uniform(*settings.blur_sigma)) if rng.uniform() < settings.blur_prob else 0.0,
    )


def content_hash(data: bytes) -> str:
    """128-bit BLAKE2b of a file's bytes: equal hashes mean the same image file content."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_image_file(path) -> bytes:
    return read_file(path, "image file")


def _perspective_matrices(corners: np.ndarray, size: int) -> np.ndarray:
    """[V, 3, 3] homographies, one for each row of `corners` [V, 8]: each maps the output square onto the square
    with its corners moved by that row (fractions of the output), solved as its own 8x8 system."""
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    dst = src + corners.reshape(-1, 4, 2) * size
    x, y, u, v = src[:, 0], src[:, 1], dst[..., 0], dst[..., 1]
    system = np.zeros((len(corners), 8, 8))
    system[:, 0::2, 0], system[:, 0::2, 1], system[:, 0::2, 2] = x, y, 1
    system[:, 1::2, 3], system[:, 1::2, 4], system[:, 1::2, 5] = x, y, 1
    system[:, 0::2, 6], system[:, 0::2, 7] = -u * x, -u * y
    system[:, 1::2, 6], system[:, 1::2, 7] = -v * x, -v * y
    rhs = np.stack([u, v], axis=2).reshape(-1, 8, 1)
    h = np.linalg.solve(system, rhs)[..., 0]
    return np.concatenate([h, np.ones((len(h), 1))], axis=1).reshape(-1, 3, 3)


def view_matrices(params: list[ViewParams], width: int, height: int, size: int) -> np.ndarray:
    """float64 [V, 3, 3]: for each view, the map from output pixel coordinates to the coordinates of the image
    displayed at width x height. Each matrix is the product of its own factors, the same numbers it gets alone, made
    in a few numpy calls for all the views: a reader makes them for every view of every image."""
    factors = []
    for p in params:
        x, y, w, h = p.crop
        a = math.radians(p.angle)
        cos, sin = math.cos(a), math.sin(a)
        factors += (1, 0, (x + w / 2) * width, 0, 1, (y + h / 2) * height, 0, 0, 1,  # to the crop's centre
                    cos, -sin, 0, sin, cos, 0, 0, 0, 1,  # rotate
                    w * width / size, 0, 0, 0, h * height / size, 0, 0, 0, 1,  # scale
                    -1.0 if p.flip else 1.0, 0, 0, 0, 1, 0, 0, 0, 1)  # flip
    to_input, rotate, scale, flip = np.array(factors, dtype=np.float64).reshape(-1, 4, 3, 3).transpose(1, 0, 2, 3)
    to_centre = np.array([[1, 0, -size / 2], [0, 1, -size / 2], [0, 0, 1]], dtype=np.float64)
    out = to_input @ rotate @ scale @ flip @ to_centre
    moved = [k for k, p in enumerate(params) if any(p.corners)]
    if moved:
        corners = np.array([params[k].corners for k in moved], dtype=np.float64)
        out[moved] = out[moved] @ _perspective_matrices(corners, size)
    return out


def blur_radius(settings: AugmentSettings) -> int:
    """Half-width of every view's blur kernel: three of the largest sigma the settings allow."""
    return max(1, math.ceil(3 * max(settings.blur_sigma)))


def view_transforms(params: list[ViewParams], width: int, height: int, size: int) -> ViewTransforms:
    """The numbers mlprep.views renders `params` from, for an image displayed at width x height."""
    colour, shift = colour_transforms((p.brightness, p.contrast, p.saturation, p.hue) for p in params)
    return ViewTransforms(
        sampling=view_matrices(params, width, height, size),
        colour=colour.astype(np.float32),
        shift=shift.astype(np.float32),
        blur=np.array([p.blur_sigma for p in params], dtype=np.float32),
    )


def render_views(image: torch.Tensor, params: list[ViewParams], size: int, padding_mode: str = "border",
                 radius: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W] (one decoded image, on any device) + V view params -> uint8 [V, 3, size, size], through
    the same renderer the encode path uses."""
    _, height, width = image.shape
    if radius is None:
        radius = max(1, math.ceil(3 * max([p.blur_sigma for p in params] + [0.0])))
    renderer = ViewRenderer(size, len(params), image.device, padding_mode, radius)
    views, _ = renderer([image.float()], [view_transforms(params, width, height, size)], [(width, height)])
    return views
