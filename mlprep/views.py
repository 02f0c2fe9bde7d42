"""Image bytes -> views encoded on the model's device: the one image path of sku_index and probe_qa.

CPU workers do only what must happen on a CPU: read the bytes, parse the header, and either decode the
image (a reduced-size JPEG draft, PNG, CMYK, greyscale, progressive files: whatever the device's decoder
does not take) or pass baseline JPEG bytes on to the device's decoder (nvjpeg through torchvision on a
GPU). Each item's views are numbers made on the CPU as well: a 3x3 sampling matrix, a colour transform and
a blur sigma per view, from the seeded view parameters. Workers pack a chunk of items into one buffer, with
decoded pixels already laid out in a few canvases (blocks of one shape each), so one message and one
host-to-device copy carry a whole chunk and the device places none of them.

On the device the render of a chunk is a fixed number of operations, whatever its images: the numbers of
all its views go over in one copy, one `grid_sample` per canvas samples every view of its images, colour is
one batched product, the blurred views are filtered together; then the views are encoded in fixed-size
batches. Nothing in the loop waits for the device. On a CPU the same code runs with the model's device `cpu`.

A view's pixels come from element-wise steps over its own numbers and its own image, colour runs over a fixed
number of slots, and an image's canvas shape depends on the image alone, so a view's pixels, and then its
embedding, never depend on which other items shared its chunk: results are the same whatever the shard count.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from mlprep.devices import to_device, to_host
from mlprep.failures import ItemError, decoder_message, describe_error

DECODERS = ("auto", "cpu", "device")
# The device decodes a JPEG at full size: larger ones take the CPU's reduced-size draft instead, and one
# decoder call takes JPEGs of at most this many pixels together (GPU memory stays bounded).
DEVICE_DECODE_MAX_PIXELS = 50_000_000
DEVICE_DECODE_BATCH_PIXELS = 400_000_000
_EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------- CPU side: header, decode, view numbers


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding its pixels."""

    width: int  # as displayed: EXIF orientation applied
    height: int
    stored: tuple[int, int]  # (width, height) as stored in the file
    orientation: int
    device_decodable: bool  # a baseline 3-channel JPEG with its end marker: what nvjpeg takes


@contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """The image opened (header parsed, nothing decoded yet); any decoder error inside is an ItemError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            yield img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _decode_error(err, data) from err


def _header(img: Image.Image, data: bytes) -> Header:
    stored = img.size
    orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    if orientation not in range(1, 9):
        orientation = 1
    plain_jpeg = (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
                  and not img.info.get("progression") and data.rstrip(b"\0")[-2:] == b"\xff\xd9")
    width, height = (stored[1], stored[0]) if orientation >= 5 else stored
    return Header(width, height, stored, orientation, plain_jpeg)


def read_header(data: bytes) -> Header:
    with _opened(data) as img:
        return _header(img, data)


# HEIF brands (iPhone photos are HEIC): no decoder for them is installed, and the failure should say what the file is
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _decode_error(err: Exception, data: bytes) -> ItemError:
    """The reason code of a decoder's exception: a file that is no image, one cut short, a decompression bomb
    (a header declaring more pixels than PIL's limit, Image.MAX_IMAGE_PIXELS x 2: too_many_pixels, the same
    code as the service's own, lower limit), or another decoding error."""
    size = len(data)
    if isinstance(err, UnidentifiedImageError):
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            return ItemError("not_an_image", f"a HEIC/HEIF image (the iPhone's photo format), which is not decoded "
                                             f"here: convert it to JPEG ({size} bytes)")
        return ItemError("not_an_image", f"not an image any decoder recognises ({size} bytes)")
    if isinstance(err, Image.DecompressionBombError):
        return ItemError("too_many_pixels", f"refused from its header, a possible decompression bomb: {err}")
    if "truncat" in str(err).lower():
        return ItemError("truncated", f"image data ends early: {decoder_message(err)}")
    return ItemError("decode_error", f"{type(err).__name__}: {decoder_message(err)}")


def decode_image(data: bytes, min_side: int) -> torch.Tensor:
    """Decode image bytes on the CPU to uint8 [3, H, W] RGB with its short side in [min_side, 2 * min_side)
    (smaller images stay as they are).

    JPEGs are decoded at reduced scale (draft), which costs a fraction of a full decode; EXIF orientation is
    applied, since phone photos of products often carry it. Errors are ItemErrors with a reason code
    (not_an_image, truncated, decode_error).
    """
    with _opened(data) as img:
        return _decoded(img, min_side)


def decode_within(data: bytes, mode: str, max_side: int, resample=Image.BILINEAR) -> Image.Image:
    """Image bytes -> a PIL image in `mode`, EXIF orientation applied, its long side at most `max_side` (a JPEG is
    decoded at reduced size where it can be): for work that needs a picture, not a model's input."""
    with _opened(data) as img:
        img.draft(mode, (max_side, max_side))
        img = flattened(ImageOps.exif_transpose(img), mode)
        if max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
        return img


def flattened(img: Image.Image, mode: str) -> Image.Image:
    """The image in `mode`; one with transparency (an alpha channel, or a transparent palette entry or colour) is
    laid on white first, as shops show a cut-out product. A plain conversion shows whatever colour the editor left
    under the transparent pixels, most often black: the product on a black ground, which no shop photo has. 16-bit
    greyscale is brought to 8 bits by its range, not clipped."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    elif img.mode.startswith("I"):  # 16-bit greyscale (PNG, TIFF), which PIL's conversion clips at 255: mostly white
        tones = np.asarray(img).astype(np.int64).clip(0, 65535)  # (32-bit and signed ones held to 16 bits)
        img = Image.fromarray((tones * 255 // 65535).astype(np.uint8), "L")
    return img if img.mode == mode else img.convert(mode)


def _decoded(img: Image.Image, min_side: int) -> torch.Tensor:
    img.draft("RGB", (min_side, min_side))
    ImageOps.exif_transpose(img, in_place=True)  # no copy of an image already upright
    img = flattened(img, "RGB")
    factor = min(img.size) // min_side
    if factor >= 2:
        img = img.reduce(factor)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def device_reduction(stored: tuple[int, int], orientation: int, min_side: int) -> int:
    """The box factor that takes a full decode to the size decode_image's draft + reduce give (1 for an image
    with a side under `min_side`: the CPU keeps those at full size too)."""
    scale = min(stored[0] // min_side, stored[1] // min_side)
    draft = next((s for s in (8, 4, 2, 1) if scale >= s), 1)
    drafted = ((stored[0] + draft - 1) // draft, (stored[1] + draft - 1) // draft)
    factor = min(drafted) // min_side
    return draft * factor if factor >= 2 else draft


@dataclass(frozen=True)
class ViewTransforms:
    """Every view of one item as numbers: what the device needs to render them."""

    sampling: np.ndarray  # float64 [V, 3, 3]: output pixel centre -> point of the displayed full-size image
    colour: np.ndarray  # float32 [V, 3, 3]: brightness, contrast and colour as one matrix ...
    shift: np.ndarray  # float32 [V, 3]: ... plus shift * (the view's mean value)
    blur: np.ndarray  # float32 [V]: Gaussian sigma, 0 for none

    def __len__(self) -> int:
        return len(self.sampling)


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = np.linalg.inv(_TO_YIQ)


def colour_transforms(params: Iterable[tuple[float, float, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(matrices [V, 3, 3], shifts [V, 3]) for V views, from each one's (brightness, contrast, saturation, hue):
    brightness scales, contrast pulls towards the view's mean, then saturation and hue rotate in YIQ; all linear,
    so out = matrix @ pixel + shift * mean. Each view's numbers are the ones it gets alone (each product is one
    matrix's), made in a few numpy calls for all the views: a reader makes them for every view of every image."""
    rows = []
    for b, c, sat, h in params:
        t = h * 2 * math.pi
        cos, sin = math.cos(t) * sat, math.sin(t) * sat
        rows.append((1, 0, 0, 0, cos, -sin, 0, sin, cos, b * c, b * (1 - c), sat == 1 and h == 0))
    numbers = np.array(rows, dtype=np.float64).reshape(-1, 12)
    rotate = _FROM_YIQ @ numbers[:, :9].reshape(-1, 3, 3) @ _TO_YIQ
    rotate[numbers[:, 11] == 1] = np.eye(3)
    return rotate * numbers[:, 9, None, None], rotate.sum(axis=2) * numbers[:, 10, None]


@dataclass
class PreparedImage:
    """One item after the CPU's work: its views as numbers and where its pixels or JPEG bytes lie in the chunk."""

    tag: Any
    width: int = 0
    height: int = 0
    transforms: ViewTransforms | None = None
    jpeg: bool = False  # the bytes are a JPEG for the device's decoder, else decoded uint8 [3, h, w] pixels
    shape: tuple[int, int, int] = (0, 0, 0)  # of the decoded pixels, as stored in the chunk's canvas
    orientation: int = 1  # how the stored pixels (or the JPEG's) map to the displayed image: an EXIF code
    reduce: int = 1
    digest: str = ""
    error: tuple[str, str] | None = None  # (reason code, reason)
    extra: Any = None  # what the caller carries along (a label, ids)
    canvas: int = -1  # decoded pixels: which of the chunk's canvases holds them, and where
    position: int = -1


@dataclass
class PreparedChunk:
    """A chunk of items as one worker delivers it: metadata, and every item's pixels or bytes in one buffer.

    Pixels decoded on the CPU lie in canvases: blocks uint8 [n, H, W, 3] of the buffer (channels last, as decoders
    write pixels), one per canvas shape (canvas_side of each side; portrait images stored transposed), zero beyond
    each image. JPEG bytes for the device's decoder follow the canvases."""

    items: list[PreparedImage]
    data: torch.Tensor  # uint8 [n]
    offsets: list[int] = field(default_factory=list)  # item k's bytes are data[offsets[k]:offsets[k + 1]]
    error: tuple[str, str] | None = None  # the whole chunk could not be read (a bad row group)
    canvases: list[tuple[int, int, int, int]] = field(default_factory=list)  # (byte offset, images, H, W)

    def pin_memory(self) -> PreparedChunk:
        """Called by the loader's pin thread: page-locked, the chunk copies to a GPU without a stall."""
        self.data = self.data.pin_memory()
        return self

    def payload(self, k: int) -> torch.Tensor:
        return self.data[self.offsets[k] : self.offsets[k + 1]]

    @property
    def canvas_bytes(self) -> int:
        return max((offset + n * 3 * h * w for offset, n, h, w in self.canvases), default=0)


def prepare_image(tag: Any, data: bytes, min_side: int, device_decode: bool,
                  views: Callable[[int, int], ViewTransforms], digest: Callable[[bytes], str] | None = None,
                  extra: Any = None, max_pixels: int | None = None) -> tuple[PreparedImage, bytes | np.ndarray]:
    """A worker's work on one image: header, CPU decode unless the device decodes it, its view numbers.
    Returns the item and its payload (JPEG bytes or decoded pixels); errors are returned, not raised.
    `max_pixels` refuses a larger image from its header, before anything is decoded (too_many_pixels)."""
    try:
        with _opened(data) as img:
            header = _header(img, data)
            if max_pixels and header.width * header.height > max_pixels:
                raise ItemError("too_many_pixels", f"{header.width}x{header.height} pixels, more than the "
                                                   f"{max_pixels:,} accepted")
            item = PreparedImage(tag, header.width, header.height, views(header.width, header.height),
                                 orientation=header.orientation, digest=digest(data) if digest else "", extra=extra)
            small_enough = header.stored[0] * header.stored[1] <= DEVICE_DECODE_MAX_PIXELS
            if device_decode and header.device_decodable and small_enough:
                item.jpeg = True
                item.reduce = device_reduction(header.stored, header.orientation, min_side)
                return item, data
            pixels = _decoded(img, min_side).numpy()
        item.shape, item.orientation = tuple(pixels.shape), 1  # decoded as displayed
        return item, pixels
    except Exception as err:  # noqa: BLE001 - any decoder error is this item's failure
        return PreparedImage(tag, error=describe_error(err), extra=extra), b""


def pack(prepared: Iterable[tuple[PreparedImage, bytes | np.ndarray]]) -> PreparedChunk:
    """Items and their payloads -> one chunk: a single buffer, so one message and one copy carry them all.
    Decoded pixels go into canvases (a worker's copy, so the device places none of them), channels last as the
    decoder wrote them, so that the copy moves whole rows (into [3, H, W] planes it took ~2.7x longer: every
    pixel's three bytes split apart); portrait images are stored transposed (orientation 5), so that a chunk's
    canvases are landscape."""
    items, payloads = [], []
    for item, payload in prepared:
        items.append(item)
        payloads.append(payload)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (item, payload) in enumerate(zip(items, payloads)):
        if isinstance(payload, np.ndarray) and payload.size:
            if payload.shape[1] > payload.shape[2]:
                payloads[k] = payload = payload.transpose(0, 2, 1)
                item.orientation = 5  # displayed = stored, transposed
            item.shape = tuple(payload.shape)
            groups.setdefault(_canvas_shape(*payload.shape[1:]), []).append(k)
    parts, canvases, size = [], [], 0
    for (height, width), members in groups.items():
        block = np.zeros((len(members), height, width, 3), dtype=np.uint8)
        for position, k in enumerate(members):
            _, h, w = payloads[k].shape
            block[position, :h, :w] = payloads[k].transpose(1, 2, 0)
            items[k].canvas, items[k].position = len(canvases), position
        canvases.append((size, len(members), height, width))
        parts.append(block.reshape(-1))
        size += block.size
    offsets = [size]
    for payload in payloads:
        if isinstance(payload, bytes) and payload:
            parts.append(np.frombuffer(payload, np.uint8))
            size += len(payload)
        offsets.append(size)
    data = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.uint8)
    return PreparedChunk(items, data, offsets, canvases=canvases)


def canvas_side(n: int) -> int:
    """The side of the canvas an image side of n pixels goes in: the smallest of 16 and 4..8 x 2^k that holds it
    (at most a quarter larger). It depends on the image alone, so a view's numbers never depend on its chunk;
    and a chunk's images share a handful of canvases, however many they are."""
    if n <= 16:
        return 16
    step = 1 << (n.bit_length() - 3)  # n / step in [4, 8)
    return -(-n // step) * step


def _canvas_shape(height: int, width: int) -> tuple[int, int]:
    return canvas_side(height), canvas_side(width)


# displayed unit square -> stored unit square, for each EXIF orientation (what orient() undoes)
_FLIP_H = np.array([[-1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
_FLIP_V = np.array([[1.0, 0, 0], [0, -1, 1], [0, 0, 1]])
_TRANSPOSE = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])


def orientation_map(orientation: int) -> np.ndarray:
    """float64 [3, 3]: a point of the displayed image in unit coordinates -> the same point of the stored pixels."""
    flips = {2: _FLIP_H, 3: _FLIP_H @ _FLIP_V, 4: _FLIP_V, 6: _FLIP_H, 7: _FLIP_H @ _FLIP_V, 8: _FLIP_V}
    out = flips.get(orientation, np.eye(3))
    return _TRANSPOSE @ out if orientation >= 5 else out


_ORIENTATION_MAPS = np.stack([orientation_map(k) for k in range(9)])  # by EXIF orientation (0 and 1: as stored)


# ---------------------------------------------------------------- device side: decode, render, encode


def choose_device_decode(spec: str, device: torch.device) -> bool:
    """`jpeg_decoder: auto` hands JPEGs to the device's decoder on a GPU and decodes them in CPU workers on a
    CPU (where the reduced-size draft is cheaper than a full decode); `device` forces the device decoder
    (on a CPU: torchvision's, in the main process), `cpu` the workers."""
    if spec not in DECODERS:
        raise ValueError(f"jpeg_decoder must be one of {', '.join(DECODERS)}; got {spec!r}")
    return spec == "device" or (spec == "auto" and device.type == "cuda")


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[C, H, W] as stored -> as displayed, for EXIF orientations 1-8 (what PIL's exif_transpose does)."""
    if orientation >= 5:
        image = image.transpose(-1, -2)
    flip = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return image.flip(flip) if flip else image


@dataclass
class ChunkPixels:
    """A chunk's images on the device: float32 canvases [n, 3, H, W] (zero beyond each image) and, per item,
    where its pixels lie, their stored size and how they map to the displayed image."""

    canvases: list[torch.Tensor]
    place: list[tuple[int, int] | None]  # item -> (canvas, position); None: no image
    stored: list[tuple[int, int]]  # item -> (height, width) of its pixels in the canvas
    orientation: list[int]

    def image(self, k: int) -> torch.Tensor | None:
        """Item k's image as displayed, float [3, h, w] (a view of its canvas)."""
        if self.place[k] is None:
            return None
        (canvas, position), (h, w) = self.place[k], self.stored[k]
        return orient(self.canvases[canvas][position, :, :h, :w], self.orientation[k])

    def __len__(self) -> int:
        return len(self.place)

    @classmethod
    def of_images(cls, images: list[torch.Tensor | None], device: torch.device) -> ChunkPixels:
        """Images as displayed, float or uint8 [3, h, w], placed in canvases (a shape of image at a time)."""
        out = cls([], [None] * len(images), [(0, 0)] * len(images), [1] * len(images))
        placing = _Placing(device)
        for k, image in enumerate(images):
            if image is not None:
                placing.add(k, image, 1)
        placing.into(out)
        return out


class _Placing:
    """Images the device made (decoded JPEGs, CPU fallbacks) gathered into canvases. Images of one shape, type and
    box reduction go together: stacked, reduced and copied into their canvas (converted to float by the copy) in
    a few device operations for all of them, so a chunk of like-sized photos costs the feed's thread a few
    launches, not a few per image."""

    def __init__(self, device: torch.device):
        self.device = device
        self.images: list[tuple[int, torch.Tensor, int, int]] = []

    def add(self, k: int, image: torch.Tensor, orientation: int, reduce: int = 1) -> None:
        """Item k's image, [3, h, w] as stored, to be box-reduced by `reduce` (avg_pool2d, ceil mode)."""
        self.images.append((k, image, orientation, reduce))

    def into(self, pixels: ChunkPixels) -> None:
        runs: dict[tuple, list[tuple[int, torch.Tensor, int, int]]] = {}
        for entry in self.images:
            runs.setdefault((tuple(entry[1].shape), entry[1].dtype, entry[3]), []).append(entry)
        canvases: dict[tuple[int, int], list[tuple[list, torch.Tensor]]] = {}
        for (_, _, reduce), members in runs.items():
            batch = torch.stack([image for _, image, _, _ in members]) if len(members) > 1 else members[0][1][None]
            if reduce > 1:
                batch = F.avg_pool2d(batch.float(), reduce, ceil_mode=True)
            canvases.setdefault(_canvas_shape(*batch.shape[2:]), []).append((members, batch))
        for (height, width), parts in canvases.items():
            canvas = torch.zeros((sum(len(members) for members, _ in parts), 3, height, width), dtype=torch.float32,
                                 device=self.device)
            position = 0
            for members, batch in parts:
                _, _, h, w = batch.shape
                canvas[position : position + len(members), :, :h, :w] = batch
                for k, _, orientation, _ in members:
                    pixels.place[k] = (len(pixels.canvases), position)
                    pixels.stored[k], pixels.orientation[k] = (h, w), orientation
                    position += 1
            pixels.canvases.append(canvas)


class DeviceImages:
    """A chunk's images on the device: the worker's canvases copied over in one transfer (no work per image),
    JPEGs decoded there, box-reduced and placed in canvases of their own (a few operations per shape of image)."""

    def __init__(self, device: torch.device, min_side: int):
        self.device = device
        self.min_side = min_side

    def __call__(self, chunk: PreparedChunk) -> ChunkPixels:
        n = len(chunk.items)
        pixels = ChunkPixels([], [None] * n, [(0, 0)] * n, [1] * n)
        if chunk.canvases:  # one copy for the chunk's decoded pixels (JPEG bytes go to the decoder from the host)
            data = to_device(chunk.data[: chunk.canvas_bytes], self.device)
            for offset, count, h, w in chunk.canvases:
                # [n, 3, H, W] with channels-last strides, kept by the conversion to float: grid_sample reads them
                # as fast as planes (the same values), and a conversion into planes would cost a transposing pass
                block = data[offset : offset + count * 3 * h * w].view(count, h, w, 3).permute(0, 3, 1, 2)
                pixels.canvases.append(block.float())
            for k, item in enumerate(chunk.items):
                if item.error is None and not item.jpeg and item.canvas >= 0:
                    pixels.place[k] = (item.canvas, item.position)
                    pixels.stored[k], pixels.orientation[k] = item.shape[1:], item.orientation
        jpegs = [k for k, item in enumerate(chunk.items) if item.error is None and item.jpeg]
        if not jpegs:
            return pixels
        groups, count = [[]], 0
        for k in jpegs:  # decoder calls of bounded size
            item = chunk.items[k]
            if groups[-1] and count + item.width * item.height > DEVICE_DECODE_BATCH_PIXELS:
                groups.append([])
                count = 0
            groups[-1].append(k)
            count += item.width * item.height
        images = [image for group in groups for image in self._decode([chunk.payload(k) for k in group])]
        placing = _Placing(self.device)
        for k, image in zip(jpegs, images):
            item = chunk.items[k]
            if image is None:  # the device's decoder refused it: the CPU decodes it, or says why it cannot
                try:
                    decoded = decode_image(chunk.payload(k).numpy().tobytes(), self.min_side)
                    placing.add(k, to_device(decoded, self.device), 1)
                except ItemError as err:
                    item.error = (err.code, str(err))
                continue
            placing.add(k, image, item.orientation, item.reduce)
        placing.into(pixels)
        return pixels

    def _decode(self, payloads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """JPEGs decoded as a batch; when the batch fails, one by one (None for those that fail alone)."""
        if not payloads:
            return []
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision 0.29 and newer

        try:
            return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out = []
            for payload in payloads:
                try:
                    out.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out


PADDING_MODES = ("border", "zeros", "reflection")
# a view's numbers, one float32 row: its map (9), clamp bounds (4), far image edges (2), colour (9), shift (3),
# blur kernel (2 r + 1)
_MAP, _CLAMP, _EDGE, _COLOUR, _SHIFT, _KERNEL = 0, 9, 13, 15, 24, 27


@dataclass(frozen=True)
class _Group:
    """`count` items of one canvas with `views` views each, rendered by one grid_sample into render slots
    slot..slot+count*views. Their canvas positions are first..first+count, or (index_at >= 0) listed in the
    chunk's index numbers from index_at."""

    canvas: int
    views: int
    count: int
    first: int
    index_at: int
    slot: int


# 2**23: a float32 in [0, 2**23) plus this has a unit in its last place of 1, so the sum is the value rounded to the
# nearest integer (ties to even, as torch.round), held in the low bits of the float's mantissa
_ROUNDING = 8388608.0


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """float32 -> uint8: clamped to [0, 255] and rounded half to even, as `clamp_(0, 255).round_().to(uint8)`, in
    place, but in two passes over the floats instead of three (a CPU converts float to uint8 slowly): the rounding
    add leaves the integer in the float's low byte, which an int32 view hands to uint8 as it is."""
    return values.clamp_(0, 255).add_(_ROUNDING).view(torch.int32).to(torch.uint8)


class ViewRenderer:
    """Renders the views of a chunk of items, on the device of its images, in a number of device operations
    that does not grow with the items in the chunk: each view is a 3x3 map from its pixel centres to its image's
    canvas (view, displayed size, orientation and canvas folded together on the host in float64), with clamp
    bounds, a colour matrix and a blur kernel; all of a chunk's numbers reach the device in one copy; one
    grid_sample per canvas samples every view of its images; colour is one batched product over the chunk's
    fixed number of slots; the blurred views are filtered together, tap by tap.

    Each view's pixels come from element-wise steps over its own numbers and its own image, and a canvas' shape
    depends on its image alone, so a view never depends on which items share its chunk or where it sits."""

    def __init__(self, size: int, slots: int, device: torch.device, padding_mode: str = "border",
                 blur_radius: int = 1):
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
        self.size, self.slots, self.device = size, slots, device
        self.padding_mode = padding_mode
        self.radius = max(1, blur_radius)
        self.row = _KERNEL + 2 * self.radius + 1
        centres = torch.arange(size, dtype=torch.float32, device=device) + 0.5
        self._px = centres.view(1, 1, size)
        self._py = centres.view(1, size, 1)
        self._offsets = np.arange(-self.radius, self.radius + 1, dtype=np.float64)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 work space of `shape` (at most `slots` rows), the same memory chunk after chunk: a chunk's render
        allocates none of its large intermediates (on a CPU each fresh one costs its page faults: a third of the
        render's time), and the first chunk allocates it for the largest."""
        space = self._buffers.get(name)
        if space is None:
            space = self._buffers[name] = torch.empty(self.slots * math.prod(shape[1:]), dtype=torch.float32,
                                                      device=self.device)
        return space[: math.prod(shape)].view(shape)

    def kernels(self, sigmas: np.ndarray) -> np.ndarray:
        """float32 [n, 2r + 1]: one normalised Gaussian per sigma over [-radius, radius]."""
        sig = np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-12).reshape(-1, 1)
        k = np.exp(-(self._offsets.reshape(1, -1) ** 2) / (2 * sig**2))
        return (k / k.sum(axis=1, keepdims=True)).astype(np.float32)

    def __call__(self, images: ChunkPixels | list[torch.Tensor | None], transforms: list[ViewTransforms | None],
                 sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
        """uint8 [slots, 3, S, S] views (item after item, each item's views in order) and the views per item
        (0 for an item without an image). `sizes`: each item's displayed size (width, height) at full scale,
        the frame its views' sampling maps are in."""
        pixels = images if isinstance(images, ChunkPixels) else ChunkPixels.of_images(images, self.device)
        s = self.size
        counts = [len(t) if (place is not None and t is not None) else 0
                  for place, t in zip(pixels.place, transforms)]
        used = sum(counts)
        if not used:
            return torch.zeros((self.slots, 3, s, s), dtype=torch.uint8, device=self.device), counts
        if used > self.slots:
            raise ValueError(f"{used} views do not fit the renderer's {self.slots} slots")
        host, groups, blurred, coloured, order = self._plan(pixels, transforms, sizes, counts)
        numbers = to_device(torch.from_numpy(host), self.device)  # the chunk's only transfer of numbers
        rows = numbers[: self.slots * self.row].view(self.slots, self.row)
        index = numbers[self.slots * self.row :].long()
        grids = self._grids(rows[:used])
        views = self._buffer("views", (self.slots, 3, s, s))
        if used < self.slots:
            views[used:] = 0
        for g in groups:  # views in render order: grouped by canvas
            canvas = pixels.canvases[g.canvas]
            n_views = g.count * g.views
            source = (canvas[g.first : g.first + g.count] if g.index_at < 0
                      else canvas.index_select(0, index[g.index_at : g.index_at + g.count]))
            sampled = F.grid_sample(source, grids[g.slot : g.slot + n_views].view(g.count, g.views * s, s, 2),
                                    mode="bilinear", padding_mode="zeros", align_corners=False)
            views[g.slot : g.slot + n_views].view(g.count, g.views, 3, s, s).copy_(
                sampled.view(g.count, 3, g.views, s, s).transpose(1, 2))
        if coloured:
            views = self._colour(views, rows)
        if blurred is not None:
            self._blur(views, rows, index[blurred[0] : blurred[1]])
        views = _to_uint8(views)
        if order is not None:  # render order -> item order: one gather of the finished views
            views = views.index_select(0, index[order : order + self.slots])
        return views, counts

    def _plan(self, pixels: ChunkPixels, transforms: list, sizes: list, counts: list[int]
              ) -> tuple[np.ndarray, list[_Group], tuple[int, int] | None, bool, int | None]:
        """The chunk's numbers as one float32 array (a row per render slot, then the index numbers), the sampling
        groups, where the blurred slots are listed, whether any view changes colour, and where the order that
        takes render slots to item order is listed (None: the same order)."""
        rows = np.zeros((self.slots, self.row), dtype=np.float32)
        rows[:, _COLOUR : _COLOUR + 9] = np.eye(3, dtype=np.float32).reshape(-1)
        rows[:, _KERNEL + self.radius] = 1
        index: list[np.ndarray] = []
        index_size = 0

        def listed(values) -> int:
            nonlocal index_size
            index.append(np.asarray(values, dtype=np.float32))
            index_size += len(values)
            return index_size - len(values)

        members: dict[tuple[int, int], list[int]] = {}  # (canvas, views) -> items, in item order
        for k, n in enumerate(counts):
            if n:
                members.setdefault((pixels.place[k][0], n), []).append(k)
        groups, blur = [], []
        order = np.arange(self.slots)  # item-order slot -> render slot
        first_slot = np.cumsum([0] + counts[:-1])
        slot = 0
        for (canvas, n), items in members.items():  # a group's items at once: numpy over arrays, no work per item
            positions = [pixels.place[k][1] for k in items]
            consecutive = positions == list(range(positions[0], positions[0] + len(positions)))
            groups.append(_Group(canvas, n, len(items), positions[0], -1 if consecutive else listed(positions), slot))
            _, _, canvas_h, canvas_w = pixels.canvases[canvas].shape
            height, width = np.array([pixels.stored[k] for k in items], dtype=np.float64).T
            shown_w, shown_h = np.array([sizes[k] for k in items], dtype=np.float64).T
            # displayed full-size pixels -> displayed unit square -> stored unit square -> canvas' [-1, 1]
            to_unit = np.zeros((len(items), 3, 3))
            to_unit[:, 0, 0], to_unit[:, 1, 1], to_unit[:, 2, 2] = 1 / shown_w, 1 / shown_h, 1.0
            to_canvas = np.zeros((len(items), 3, 3))
            to_canvas[:, 0, 0], to_canvas[:, 1, 1] = 2 * width / canvas_w, 2 * height / canvas_h
            to_canvas[:, :2, 2], to_canvas[:, 2, 2] = -1, 1
            to_canvas = to_canvas @ _ORIENTATION_MAPS[[pixels.orientation[k] for k in items]] @ to_unit
            view_rows = rows[slot : slot + n * len(items)]
            sampling = np.stack([transforms[k].sampling for k in items])  # [items, n, 3, 3]
            view_rows[:, _MAP : _MAP + 9] = (to_canvas[:, None] @ sampling).reshape(-1, 9)
            bounds = np.stack([np.full(len(items), 1 / canvas_w - 1), (2 * width - 1) / canvas_w - 1,
                               np.full(len(items), 1 / canvas_h - 1), (2 * height - 1) / canvas_h - 1,
                               2 * width / canvas_w - 1, 2 * height / canvas_h - 1], 1)
            view_rows[:, _CLAMP : _EDGE + 2] = np.repeat(bounds, n, axis=0)
            view_rows[:, _COLOUR : _COLOUR + 9] = np.concatenate([transforms[k].colour for k in items]).reshape(-1, 9)
            view_rows[:, _SHIFT : _SHIFT + 3] = np.concatenate([transforms[k].shift for k in items])
            sigmas = np.concatenate([transforms[k].blur for k in items])
            if (sigmas > 0).any():
                view_rows[sigmas > 0, _KERNEL:] = self.kernels(sigmas[sigmas > 0])
                blur.append(slot + np.flatnonzero(sigmas > 0))
            order[(first_slot[items][:, None] + np.arange(n)).reshape(-1)] = np.arange(slot, slot + n * len(items))
            slot += n * len(items)
        live = rows[:slot]
        blurred = (listed(np.concatenate(blur)), index_size) if blur else None
        coloured = bool(live[:, _SHIFT : _SHIFT + 3].any()
                        or (live[:, _COLOUR : _COLOUR + 9] != np.eye(3, dtype=np.float32).reshape(-1)).any())
        reorder = None if (order == np.arange(self.slots)).all() else listed(order)
        numbers = np.concatenate([rows.reshape(-1)] + index) if index else rows.reshape(-1)
        return numbers, groups, blurred, coloured, reorder

    def _grids(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [n, S, S, 2]: where each view's pixel centres fall in its canvas (grid_sample's [-1, 1]),
        clamped to its image's pixel centres (border), reflected at its image's edges (reflection), or left as
        they are (zeros: the canvas is zero beyond the image).

        x and y are computed in planes of their own, each contiguous, and handed to grid_sample as one strided view
        of both (it reads a grid through its strides): element-wise work on an interleaved [..., 2] axis runs at
        half speed or worse on a CPU, and interleaving the planes would cost a pass of its own. The planes lie in
        the work space the colour step writes next: in a shard job every chunk's render starts with its memory out
        of the caches (the forward pass in between went through the model's weights), and each work space a render
        writes costs its first touch again."""
        m = rows[:, _MAP : _MAP + 9].view(-1, 9, 1, 1)
        px, py = self._px, self._py
        n, s = len(m), self.size
        space = self._buffer("work", (self.slots, 3 * s, s)).view(3, self.slots, s, s)  # x, y, w
        planes = space[:2, :n]
        w = torch.add(m[:, 6] * px + m[:, 8], m[:, 7] * py, out=space[2, :n])
        for axis in (0, 1):
            c = planes[axis]
            torch.add(m[:, 3 * axis] * px + m[:, 3 * axis + 2], m[:, 3 * axis + 1] * py, out=c)
            c.div_(w)
            low, high = (rows[:, _CLAMP + 2 * axis + j].view(-1, 1, 1) for j in (0, 1))
            if self.padding_mode == "reflection":  # about the image's edges -1 and edge, then onto its pixels
                edge = rows[:, _EDGE + axis].view(-1, 1, 1)
                span = edge + 1
                far = (c + 1).abs_()
                flips = torch.floor(far / span)
                extra = far - flips * span
                c.copy_(torch.where(torch.remainder(flips, 2) == 0, extra - 1, edge - extra))
            if self.padding_mode != "zeros":
                torch.minimum(torch.maximum(c, low, out=c), high, out=c)  # as clamp(c, low, high), at twice its speed
        return planes.permute(1, 2, 3, 0)

    def _colour(self, views: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and colour of every slot: one batched product over the fixed slots."""
        flat = views.view(self.slots, 3, -1)
        mean = flat.mean(dim=(1, 2))  # row by row over a fixed shape: the same whatever the chunk holds
        out = torch.bmm(rows[:, _COLOUR : _COLOUR + 9].reshape(self.slots, 3, 3), flat,
                        out=self._buffer("work", flat.shape))  # the grids' memory: they are used by now
        out += (rows[:, _SHIFT : _SHIFT + 3] * mean.view(-1, 1)).unsqueeze(-1)
        return out.view_as(views)

    def _blur(self, views: torch.Tensor, rows: torch.Tensor, blurred: torch.Tensor) -> None:
        """Separable Gaussian blur (edges replicated) of the listed slots, all at once: 2r + 1 multiply-adds a
        pass, each element-wise, so a view's result never depends on how many are blurred with it."""
        r, s = self.radius, self.size
        group = views.index_select(0, blurred)
        kernel = rows.index_select(0, blurred)[:, _KERNEL:].reshape(-1, 2 * r + 1, 1, 1, 1)
        for dim in (3, 2):
            padded = F.pad(group, (r, r, 0, 0) if dim == 3 else (0, 0, r, r), mode="replicate")
            out = padded.narrow(dim, 0, s) * kernel[:, 0]
            for tap in range(1, 2 * r + 1):
                out.addcmul_(padded.narrow(dim, tap, s), kernel[:, tap])
            group = out
        views.index_copy_(0, blurred, group)


@dataclass
class EncodedViews:
    """Encoded items in input order, with their views' embeddings, and the items that failed."""

    items: list[PreparedImage]  # items whose views were encoded, in order
    counts: list[int]  # views per item
    vectors: np.ndarray  # float32 [sum(counts), D]
    failed: list[PreparedImage]  # items (and whole chunks' items, with the chunk's error) that failed
    encode_seconds: float = 0.0


class ViewStage:
    """The device half of the path: chunks in, embeddings out, with the encoder's device kept busy.

    Work is queued on the device without waiting for it: views gather in a staging buffer on the device and
    go to the encoder in full batches; embeddings stay on the device and come back every `sync_every`
    batches, so on a GPU the copies, the rendering and the forward passes of successive chunks overlap
    with the CPU's work on the next chunk."""

    def __init__(self, encoder, views_per_item: int, items_per_chunk: int, padding_mode: str = "border",
                 blur_radius: int = 1, sync_every: int = 64, forward: Callable | None = None):
        self.encoder = encoder
        self.forward = forward or encoder.encode_device  # uint8 views -> rows on the device (embeddings, logits)
        self.device = encoder.device
        size = encoder.image_size
        self.images = DeviceImages(self.device, size)
        self.renderer = ViewRenderer(size, views_per_item * items_per_chunk, self.device, padding_mode, blur_radius)
        self.batch = encoder.batch_size
        self.staging = torch.empty((self.batch + self.renderer.slots, 3, size, size), dtype=torch.uint8,
                                   device=self.device)
        self.sync_every = sync_every
        self.encode_seconds = 0.0

    def stream(self, chunks: Iterable[PreparedChunk], on_item: Callable[[PreparedImage], None] | None = None,
               on_encoded: Callable[[], None] | None = None) -> Iterator[EncodedViews]:
        """Encoded items part by part (every `sync_every` batches, and at the end): memory stays bounded."""
        import time

        waiting: list[tuple[PreparedImage, int]] = []  # items whose views are queued, in order
        failed: list[PreparedImage] = []
        on_device: list[torch.Tensor] = []
        spare = np.zeros((0, 0), dtype=np.float32)  # rows back on the host that no item has taken yet
        pending = 0

        def encode(n: int) -> None:
            nonlocal pending
            started = time.perf_counter()
            on_device.append(self.forward(self.staging[:n]))
            self.encode_seconds += time.perf_counter() - started
            rest = pending - n
            if rest:
                self.staging[:rest] = self.staging[n:pending].clone() if rest > n else self.staging[n:pending]
            pending = rest
            if on_encoded is not None:
                on_encoded()

        def hand_out() -> EncodedViews:
            nonlocal spare, failed
            rows = to_host(on_device) if on_device else np.zeros((0, 0), np.float32)
            on_device.clear()
            rows = np.concatenate([spare, rows]) if len(spare) else rows
            taken, used = 0, 0
            while taken < len(waiting) and used + waiting[taken][1] <= len(rows):
                used += waiting[taken][1]
                taken += 1
            part = EncodedViews([i for i, _ in waiting[:taken]], [n for _, n in waiting[:taken]], rows[:used],
                                failed, self.encode_seconds)
            del waiting[:taken]
            spare, failed = rows[used:], []
            return part

        for chunk in chunks:
            if chunk.error is not None:
                for item in chunk.items:
                    item.error = item.error or chunk.error
                    if on_item is not None:
                        on_item(item)
                failed.extend(chunk.items)
                continue
            images = self.images(chunk)
            rendered, views_per = self.renderer(images, [i.transforms for i in chunk.items],
                                                [(i.width, i.height) for i in chunk.items])
            for item, n in zip(chunk.items, views_per):
                if on_item is not None:
                    on_item(item)
                if item.error is not None or not n:
                    failed.append(item)
                else:
                    waiting.append((item, n))
            used = sum(views_per)
            if used:
                self.staging[pending : pending + used] = rendered[:used]
                pending += used
            while pending >= self.batch:
                encode(self.batch)
            if len(on_device) >= self.sync_every:
                yield hand_out()
        if pending:
            encode(pending)
        yield hand_out()

    def run(self, chunks: Iterable[PreparedChunk], on_item: Callable[[PreparedImage], None] | None = None,
            on_encoded: Callable[[], None] | None = None) -> EncodedViews:
        """Every item of `chunks`, encoded (all vectors in memory: a shard's worth)."""
        parts = list(self.stream(chunks, on_item, on_encoded))
        vectors = [p.vectors for p in parts if len(p.vectors)]
        return EncodedViews([i for p in parts for i in p.items], [n for p in parts for n in p.counts],
                            np.concatenate(vectors) if vectors else np.zeros((0, self.encoder.dim), np.float32),
                            [i for p in parts for i in p.failed], self.encode_seconds)


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def items_per_chunk(batch_size: int, views_per_item: int) -> int:
    """Items per chunk: enough views to fill one encoder batch (a fixed number: results never depend on it)."""
    return max(1, math.ceil(batch_size / max(1, views_per_item)))


def iter_chunks(dataset: torch.utils.data.Dataset, workers: int, pin: bool, ahead: int = 2) -> Iterator[PreparedChunk]:
    """Chunks in order, prepared by `workers` CPU processes (in this one when 0); page-locked for a GPU."""
    from mlprep.workers import in_order

    return in_order(dataset, workers, ahead=ahead, pin_memory=pin)
