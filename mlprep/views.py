"""Image bytes -> views encoded on the model's device: the one image path of sku_index and probe_qa.

CPU workers do only what must happen on a CPU: read the bytes, parse the header, and either decode the
image (a reduced-size JPEG draft, PNG, CMYK, greyscale, progressive files: whatever the device's decoder
does not take) or pass baseline JPEG bytes on to the device's decoder (nvjpeg through torchvision on a
GPU). Each item's views are numbers made on the CPU as well: a 3x3 sampling matrix, a colour transform and
a blur sigma per view, from the seeded view parameters. Workers pack a chunk of items into one buffer, so
one message and one host-to-device copy carry a whole chunk. On the device, one decoded image per item is
sampled into all of its views (one `grid_sample`), colour and blur run over the chunk's views at once, and
the views are encoded in fixed-size batches. On a CPU the same code runs with the model's device `cpu`.

Every device-side step has a fixed shape (a chunk always has the same number of view slots, blurred views
go in fixed-size groups), so a view's pixels, and then its embedding, never depend on which other items
shared its chunk: results are the same whatever the shard count.
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

from mlprep.failures import ItemError, decoder_message, describe_error

DECODERS = ("auto", "cpu", "device")
BLUR_GROUP = 8  # blurred views are filtered in groups of this many (a fixed shape)
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
        raise _decode_error(err, len(data)) from err


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


def _decode_error(err: Exception, size: int) -> ItemError:
    """The reason code of a decoder's exception: a file that is no image, one cut short, a decompression bomb
    (a header declaring more pixels than PIL's limit, Image.MAX_IMAGE_PIXELS x 2: too_many_pixels, the same
    code as the service's own, lower limit), or another decoding error."""
    if isinstance(err, UnidentifiedImageError):
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


def _decoded(img: Image.Image, min_side: int) -> torch.Tensor:
    img.draft("RGB", (min_side, min_side))
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
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


def colour_transform(brightness: float, contrast: float, saturation: float,
                     hue: float) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, shift) for one view: brightness scales, contrast pulls towards the view's mean, then saturation
    and hue rotate in YIQ; all linear, so out = matrix @ pixel + shift * mean."""
    t = hue * 2 * math.pi
    c, s = math.cos(t) * saturation, math.sin(t) * saturation
    rotate = _FROM_YIQ @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ _TO_YIQ
    if saturation == 1 and hue == 0:
        rotate = np.eye(3)
    matrix = rotate * (brightness * contrast)
    shift = rotate.sum(axis=1) * (brightness * (1 - contrast))
    return matrix, shift


@dataclass
class PreparedImage:
    """One item after the CPU's work: its views as numbers and where its pixels or JPEG bytes lie in the chunk."""

    tag: Any
    width: int = 0
    height: int = 0
    transforms: ViewTransforms | None = None
    jpeg: bool = False  # the bytes are a JPEG for the device's decoder, else decoded uint8 [3, h, w] pixels
    shape: tuple[int, int, int] = (0, 0, 0)
    orientation: int = 1
    reduce: int = 1
    digest: str = ""
    error: tuple[str, str] | None = None  # (reason code, reason)
    extra: Any = None  # what the caller carries along (a label, ids)


@dataclass
class PreparedChunk:
    """A chunk of items as one worker delivers it: metadata, and every item's bytes in one buffer."""

    items: list[PreparedImage]
    data: torch.Tensor  # uint8 [n]
    offsets: list[int] = field(default_factory=list)  # item k's bytes are data[offsets[k]:offsets[k + 1]]
    error: tuple[str, str] | None = None  # the whole chunk could not be read (a bad row group)

    def pin_memory(self) -> PreparedChunk:
        """Called by the loader's pin thread: page-locked, the chunk copies to a GPU without a stall."""
        self.data = self.data.pin_memory()
        return self

    def payload(self, k: int) -> torch.Tensor:
        return self.data[self.offsets[k] : self.offsets[k + 1]]


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
        item.shape = tuple(pixels.shape)
        return item, pixels
    except Exception as err:  # noqa: BLE001 - any decoder error is this item's failure
        return PreparedImage(tag, error=describe_error(err), extra=extra), b""


def pack(prepared: Iterable[tuple[PreparedImage, bytes | np.ndarray]]) -> PreparedChunk:
    """Items and their payloads -> one chunk: a single buffer, so one message and one copy carry them all."""
    items, parts, offsets = [], [], [0]
    for item, payload in prepared:
        raw = payload if isinstance(payload, bytes) else np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
        items.append(item)
        parts.append(np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw)
        offsets.append(offsets[-1] + len(parts[-1]))
    data = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.uint8)
    return PreparedChunk(items, data, offsets)


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


class DeviceImages:
    """A chunk's images on the device as float [3, h, w]: decoded pixels copied over, JPEGs decoded there."""

    def __init__(self, device: torch.device, min_side: int):
        self.device = device
        self.min_side = min_side

    def __call__(self, chunk: PreparedChunk) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(chunk.items)
        jpegs = [k for k, item in enumerate(chunk.items) if item.error is None and item.jpeg]
        decoded = [k for k, item in enumerate(chunk.items) if item.error is None and not item.jpeg]
        if decoded:  # one copy for the chunk (JPEG bytes go to the decoder from host memory)
            data = chunk.data.to(self.device, non_blocking=True)
            for k in decoded:
                out[k] = data[chunk.offsets[k] : chunk.offsets[k + 1]].view(chunk.items[k].shape).float()
        groups, pixels = [[]], 0
        for k in jpegs:  # decoder calls of bounded size
            item = chunk.items[k]
            if groups[-1] and pixels + item.width * item.height > DEVICE_DECODE_BATCH_PIXELS:
                groups.append([])
                pixels = 0
            groups[-1].append(k)
            pixels += item.width * item.height
        images = [image for group in groups for image in self._decode([chunk.payload(k) for k in group])]
        for k, image in zip(jpegs, images):
            item = chunk.items[k]
            if image is None:  # the device's decoder refused it: the CPU decodes it, or says why it cannot
                try:
                    out[k] = decode_image(chunk.payload(k).numpy().tobytes(), self.min_side).to(self.device).float()
                except ItemError as err:
                    item.error = (err.code, str(err))
                continue
            image = image.float()
            if item.reduce > 1:
                image = F.avg_pool2d(image.unsqueeze(0), item.reduce, ceil_mode=True).squeeze(0)
            out[k] = orient(image, item.orientation)
        return out

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


class ViewRenderer:
    """Renders the views of a chunk of items, on the device of its images, in fixed shapes."""

    def __init__(self, size: int, slots: int, device: torch.device, padding_mode: str = "border",
                 blur_radius: int = 1):
        self.size, self.slots, self.device = size, slots, device
        self.padding_mode = padding_mode
        self.radius = max(1, blur_radius)
        centres = torch.arange(size, dtype=torch.float32, device=device) + 0.5
        self._px = centres.view(1, 1, size)
        self._py = centres.view(1, size, 1)
        self._offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)

    def _grids(self, sampling: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """float64 [n, 3, 3] maps + [n, 2] image sizes -> grid_sample grids float32 [n, S, S, 2].

        The normalisation to [-1, 1] is folded into the maps (in float64), so each grid coordinate costs one
        add and one divide over the full grid: (row term + column term) / w - 1."""
        m = sampling.clone()
        m[:, 0] *= (2 / sizes[:, 0]).view(-1, 1)
        m[:, 1] *= (2 / sizes[:, 1]).view(-1, 1)
        m = m.float()
        px, py = self._px, self._py
        n, s = len(m), self.size
        grid = torch.empty((n, s, s, 2), dtype=torch.float32, device=self.device)
        w = (m[:, 2, 0, None, None] * px + m[:, 2, 2, None, None]) + m[:, 2, 1, None, None] * py
        for axis in (0, 1):
            out = grid[..., axis]
            torch.add(m[:, axis, 0, None, None] * px + m[:, axis, 2, None, None], m[:, axis, 1, None, None] * py,
                      out=out)
            out.div_(w).sub_(1)
        return grid

    def kernels(self, sigmas: np.ndarray) -> torch.Tensor:
        """One normalised Gaussian per sigma over [-radius, radius] (a fixed width for every view)."""
        sig = torch.as_tensor(np.maximum(sigmas, 1e-12), dtype=torch.float64).view(-1, 1)
        k = torch.exp(-(self._offsets.view(1, -1) ** 2) / (2 * sig**2))
        return (k / k.sum(dim=1, keepdim=True)).float()

    def __call__(self, images: list[torch.Tensor | None], transforms: list[ViewTransforms | None],
                 sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
        """uint8 [slots, 3, S, S] views (item after item, each item's views in order) and the views per item
        (0 for an item without an image)."""
        s = self.size
        counts = [len(t) if (image is not None and t is not None) else 0 for image, t in zip(images, transforms)]
        if not sum(counts):
            return torch.zeros((self.slots, 3, s, s), dtype=torch.uint8, device=self.device), counts
        views = torch.empty((self.slots, 3, s, s), dtype=torch.float32, device=self.device)
        views[sum(counts) :] = 0
        live = [k for k, n in enumerate(counts) if n]
        sampling = torch.from_numpy(np.concatenate([transforms[k].sampling for k in live])).to(self.device)
        size_rows = np.repeat(np.array([sizes[k] for k in live], dtype=np.float64), [counts[k] for k in live], axis=0)
        grids = self._grids(sampling, torch.from_numpy(size_rows).to(self.device))
        start, first = 0, {}
        for k in live:
            first[k] = start
            start += counts[k]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k in live:
            by_shape.setdefault((counts[k], *images[k].shape), []).append(k)
        for (n_views, *_), members in by_shape.items():
            # One grid_sample per group of same-sized images: each image's views stacked as rows of one grid.
            source = torch.stack([images[k] for k in members]) if len(members) > 1 else images[members[0]][None]
            starts = [first[k] for k in members]
            if starts == list(range(starts[0], starts[0] + n_views * len(members), n_views)):  # consecutive slots
                rows = grids[starts[0] : starts[0] + n_views * len(members)].view(len(members), n_views * s, s, 2)
            else:
                rows = torch.stack([grids[a : a + n_views].reshape(n_views * s, s, 2) for a in starts])
            sampled = F.grid_sample(source, rows, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)
            sampled = sampled.view(len(members), 3, n_views, s, s).transpose(1, 2)
            if starts[0] + n_views * len(members) == starts[-1] + n_views:
                views[starts[0] : starts[-1] + n_views].view(len(members), n_views, 3, s, s).copy_(sampled)
            else:
                for j, a in enumerate(starts):
                    views[a : a + n_views] = sampled[j]
        views = self._colour(views, live, transforms, start)
        self._blur(views, np.concatenate([transforms[k].blur for k in live]))
        return views.clamp_(0, 255).round_().to(torch.uint8), counts

    def _colour(self, views: torch.Tensor, live: list[int], transforms: list, used: int) -> torch.Tensor:
        matrix = np.zeros((self.slots, 3, 3), dtype=np.float32)
        matrix[:, [0, 1, 2], [0, 1, 2]] = 1
        shift = np.zeros((self.slots, 3), dtype=np.float32)
        matrix[:used] = np.concatenate([transforms[k].colour for k in live])
        shift[:used] = np.concatenate([transforms[k].shift for k in live])
        if not shift.any() and (matrix == np.eye(3, dtype=np.float32)).all():
            return views
        flat = views.view(self.slots, 3, -1)
        mean = flat.mean(dim=(1, 2))  # row by row over a fixed shape: the same whatever the chunk holds
        out = torch.bmm(torch.from_numpy(matrix).to(self.device, non_blocking=True), flat)
        out += (torch.from_numpy(shift).to(self.device, non_blocking=True) * mean.view(-1, 1)).unsqueeze(-1)
        return out.view_as(views)

    def _blur(self, views: torch.Tensor, sigmas: np.ndarray) -> None:
        """Separable Gaussian blur of the views with sigma > 0, in groups of BLUR_GROUP (zero-padded)."""
        blurred = np.flatnonzero(sigmas > 0)
        if not len(blurred):
            return
        r, s = self.radius, self.size
        for start in range(0, len(blurred), BLUR_GROUP):
            members = blurred[start : start + BLUR_GROUP]
            index = torch.from_numpy(members).to(self.device)
            group = torch.zeros((BLUR_GROUP, 3, s, s), dtype=views.dtype, device=self.device)
            group[: len(members)] = views.index_select(0, index)
            kernel = torch.zeros((BLUR_GROUP, 2 * r + 1))
            kernel[: len(members)] = self.kernels(sigmas[members])
            kernel[len(members) :, r] = 1
            kernel = kernel.repeat_interleave(3, dim=0).to(self.device)  # [G * 3, K]
            flat = group.reshape(1, BLUR_GROUP * 3, s, s).contiguous(memory_format=torch.channels_last)
            flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kernel.view(-1, 1, 1, 2 * r + 1),
                            groups=BLUR_GROUP * 3)
            flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kernel.view(-1, 1, 2 * r + 1, 1),
                            groups=BLUR_GROUP * 3)
            views.index_copy_(0, index, flat.reshape(BLUR_GROUP, 3, s, s)[: len(members)].contiguous())


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
            rows = torch.cat(on_device).cpu().numpy() if on_device else np.zeros((0, 0), np.float32)
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
