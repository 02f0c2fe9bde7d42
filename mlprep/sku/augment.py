"""Shop-floor augmentations, all views of one image rendered as one tensor batch.

An image is decoded once at reduced size (JPEG draft), then every view is one projective warp
(random resized crop + rotation + perspective + flip folded into a single 3x3 matrix, applied by
one grid_sample over the batch of views) followed by per-view colour arithmetic and an optional
separable Gaussian blur. View 0 is the plain original (short side resized, centre crop), the
same preprocessing a query image gets at search time.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mlprep.failures import ItemError
from mlprep.rng import rng_for


@dataclass(frozen=True)
class AugmentSettings:
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    rotation_deg: float = 15.0
    perspective: float = 0.15
    flip_prob: float = 0.0
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    padding_mode: str = "border"

    @classmethod
    def from_config(cls, cfg: dict | None) -> AugmentSettings:
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown augment settings: {', '.join(sorted(unknown))}")
        for key in ("crop_scale", "crop_ratio", "blur_sigma"):
            if key in cfg:
                cfg[key] = tuple(float(v) for v in cfg[key])
        return cls(**cfg)


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


def original_view(width: int, height: int) -> ViewParams:
    """The centre square crop: what CLIP's resize + centre-crop preprocessing shows the model."""
    side = min(width, height)
    return ViewParams(0, ((width - side) / 2 / width, (height - side) / 2 / height, side / width, side / height))


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
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ItemError("missing", "image file not found") from err
    except OSError as err:
        raise ItemError("decode_error", f"cannot read the file: {err}") from err


def decode_image(data: bytes, min_side: int) -> torch.Tensor:
    """Decode image bytes to uint8 [3, H, W] RGB with its short side in [min_side, 2 * min_side).

    JPEGs are decoded at reduced scale (draft), which costs a fraction of a full decode; EXIF
    orientation is applied, since phone photos of products often carry it. Errors are ItemErrors
    with a reason code (not_an_image, truncated, decode_error).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (min_side, min_side))
            img = ImageOps.exif_transpose(img)
            img = img.convert("RGB")
            factor = min(img.size) // min_side
            if factor >= 2:
                img = img.reduce(factor)
            array = np.asarray(img)
    except UnidentifiedImageError as err:
        raise ItemError("not_an_image", f"not an image any decoder recognises ({len(data)} bytes)") from err
    except (OSError, SyntaxError, ValueError) as err:
        if "truncat" in str(err).lower():
            raise ItemError("truncated", f"image data ends early: {err}") from err
        raise ItemError("decode_error", f"{type(err).__name__}: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_image(path, min_side: int) -> torch.Tensor:
    """decode_image of a file; a missing or unreadable file is an ItemError too."""
    return decode_image(read_image_file(path), min_side)


def _perspective_matrix(corners: tuple[float, ...], size: int) -> np.ndarray:
    """Homography that maps the output square onto the square with its corners moved by `corners`."""
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    dst = src + np.asarray(corners, dtype=np.float64).reshape(4, 2) * size
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def view_matrix(p: ViewParams, width: int, height: int, size: int) -> np.ndarray:
    """3x3 map from output pixel coordinates to input pixel coordinates for one view."""
    cx = (p.crop[0] + p.crop[2] / 2) * width
    cy = (p.crop[1] + p.crop[3] / 2) * height
    to_centre = np.array([[1, 0, -size / 2], [0, 1, -size / 2], [0, 0, 1]], dtype=np.float64)
    flip = np.diag([-1.0 if p.flip else 1.0, 1.0, 1.0])
    scale = np.diag([p.crop[2] * width / size, p.crop[3] * height / size, 1.0])
    a = math.radians(p.angle)
    rotate = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    to_input = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]], dtype=np.float64)
    warp = _perspective_matrix(p.corners, size) if any(p.corners) else np.eye(3)
    return to_input @ rotate @ scale @ flip @ to_centre @ warp


def _sampling_grid(matrices: np.ndarray, width: int, height: int, size: int) -> torch.Tensor:
    centres = np.arange(size, dtype=np.float64) + 0.5
    gx, gy = np.meshgrid(centres, centres)
    points = np.stack([gx.ravel(), gy.ravel(), np.ones(size * size)])  # [3, S*S]
    mapped = matrices @ points  # [V, 3, S*S]
    x = mapped[:, 0] / mapped[:, 2]
    y = mapped[:, 1] / mapped[:, 2]
    grid = np.stack([2 * x / width - 1, 2 * y / height - 1], axis=-1)
    return torch.from_numpy(grid.reshape(len(matrices), size, size, 2).astype(np.float32))


def _colour_matrices(params: list[ViewParams]) -> torch.Tensor:
    """Per-view 3x3 matrices doing saturation and hue rotation (in YIQ) in one multiply."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = np.linalg.inv(to_yiq)
    mats = []
    for p in params:
        t = p.hue * 2 * math.pi
        c, s = math.cos(t) * p.saturation, math.sin(t) * p.saturation
        mats.append(from_yiq @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ to_yiq)
    return torch.from_numpy(np.stack(mats).astype(np.float32))


def _blur(views: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur with a sigma per view (sigma 0 leaves a view unchanged)."""
    radius = max(1, math.ceil(3 * max(sigmas)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = []
    for sigma in sigmas:
        if sigma <= 0:
            k = (offsets == 0).float()
        else:
            k = torch.exp(-(offsets**2) / (2 * sigma**2))
        kernels.append(k / k.sum())
    n, c, h, w = views.shape
    kernel = torch.stack(kernels).repeat_interleave(c, dim=0)  # [V*C, K]
    flat = views.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def render_views(
    image: torch.Tensor, params: list[ViewParams], size: int, padding_mode: str = "border"
) -> torch.Tensor:
    """uint8 [3, H, W] + V view params -> uint8 [V, 3, size, size]."""
    _, height, width = image.shape
    matrices = np.stack([view_matrix(p, width, height, size) for p in params])
    grid = _sampling_grid(matrices, width, height, size)
    source = image.float().unsqueeze(0).expand(len(params), -1, -1, -1)
    views = F.grid_sample(source, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    if any(p.brightness != 1 or p.contrast != 1 for p in params):
        brightness = torch.tensor([p.brightness for p in params]).view(-1, 1, 1, 1)
        contrast = torch.tensor([p.contrast for p in params]).view(-1, 1, 1, 1)
        views = views * brightness
        mean = views.mean(dim=(1, 2, 3), keepdim=True)
        views = (views - mean) * contrast + mean
    if any(p.saturation != 1 or p.hue != 0 for p in params):
        views = torch.einsum("vij,vjhw->vihw", _colour_matrices(params), views)
    sigmas = [p.blur_sigma for p in params]
    if any(s > 0 for s in sigmas):
        views = _blur(views, sigmas)
    return views.clamp_(0, 255).round_().to(torch.uint8)
