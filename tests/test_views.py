"""The one image path (mlprep.views), held to stated bounds on the CPU:

- the renderer against a per-item reference (the renderer before the device path): max 1 level, mean < 0.01;
- the device's decoder path (full decode + box reduction, run here by torchvision on the CPU) against the CPU
  workers' draft decode: mean difference < 0.5 levels, max < 24 (different downscaling filters);
- a view's pixels and its embedding never depend on the rest of its chunk or on the shard split (bit-identical);
- bf16 embeddings of the same views against fp32: min cosine >= 0.999 (ViT-B-32);
- every EXIF orientation alike in both decoders; what the device decoder cannot take (PNG, greyscale, CMYK,
  progressive, a JPEG without its end marker) decoded by the CPU; a broken JPEG and a decompression bomb
  recorded as failures;
- the feed's shape, counted with torch.profiler: a chunk's render and encode issue the same operations for few
  images as for many, two host-to-device transfers and nothing that waits for the device;
- every padding mode samples as grid_sample does on the image alone, though images lie in larger canvases.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlprep.encoders import ClipEncoder, ModelSpec
from mlprep.failures import FailureLog
from mlprep.sku.augment import AugmentSettings, blur_radius, original_view, render_views, sample_view, view_matrices
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, encode_items, render_items
from mlprep.views import DeviceImages, ViewRenderer, decode_image, pack, prepare_image, read_header

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = sorted((REPO / "resources/demo/sku/images").glob("*.jpg"))
CPU = torch.device("cpu")
# every step of a view, blur included (the defaults leave blur out since it earned nothing: docs/sku_index.md)
EVERY_STEP = AugmentSettings(crop_scale=(0.5, 1.0), blur_prob=0.3)


def reference_render(image: torch.Tensor, params, size: int) -> torch.Tensor:
    """The views as the encode path rendered them before mlprep.views: one item at a time, step by step."""
    _, height, width = image.shape
    matrices = view_matrices(params, width, height, size)
    centres = np.arange(size, dtype=np.float64) + 0.5
    gx, gy = np.meshgrid(centres, centres)
    mapped = matrices @ np.stack([gx.ravel(), gy.ravel(), np.ones(size * size)])
    grid = np.stack([2 * mapped[:, 0] / mapped[:, 2] / width - 1, 2 * mapped[:, 1] / mapped[:, 2] / height - 1], -1)
    grid = torch.from_numpy(grid.reshape(len(params), size, size, 2).astype(np.float32))
    views = F.grid_sample(image.float()[None].expand(len(params), -1, -1, -1), grid, mode="bilinear",
                          padding_mode="border", align_corners=False)
    views = views * torch.tensor([p.brightness for p in params]).view(-1, 1, 1, 1)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - mean) * torch.tensor([p.contrast for p in params]).view(-1, 1, 1, 1) + mean
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    mats = []
    for p in params:
        t = p.hue * 2 * math.pi
        c, s = math.cos(t) * p.saturation, math.sin(t) * p.saturation
        mats.append(np.linalg.inv(to_yiq) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ to_yiq)
    views = torch.einsum("vij,vjhw->vihw", torch.from_numpy(np.stack(mats).astype(np.float32)), views)
    sigmas = [p.blur_sigma for p in params]
    radius = max(1, math.ceil(3 * max(sigmas)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = [(offsets == 0).float() if s <= 0 else torch.exp(-(offsets**2) / (2 * s**2)) for s in sigmas]
    kernel = torch.stack([k / k.sum() for k in kernels]).repeat_interleave(3, dim=0)
    n = len(params)
    flat = views.reshape(1, n * 3, size, size)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * 3, 1, 1, -1), groups=n * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * 3, 1, -1, 1), groups=n * 3)
    return flat.view(n, 3, size, size).clamp_(0, 255).round_().to(torch.uint8)


def _params(width: int, height: int, item: str, n: int = 7):
    settings = EVERY_STEP
    return [original_view(width, height)] + [sample_view(settings, 7, "s", item, k, width, height) for k in range(1, n)]


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92, **kwargs)
    return out.getvalue()


def _photo(size=(1280, 960)) -> Image.Image:
    return Image.open(DEMO_IMAGES[3]).convert("RGB").resize(size, Image.BICUBIC)


def _render_one(data: bytes, device_decode: bool, item: str = "x"):
    def views(width, height):
        from mlprep.sku.augment import view_transforms

        return view_transforms(_params(width, height, item, 6), width, height, 224)

    prepared, payload = prepare_image(0, data, 224, device_decode, views)
    chunk = pack([(prepared, payload)])
    images = DeviceImages(CPU, 224)(chunk)
    renderer = ViewRenderer(224, 6, CPU, "border", blur_radius(EVERY_STEP))
    out, counts = renderer(images, [prepared.transforms], [(prepared.width, prepared.height)])
    return prepared, out[: sum(counts)]


def test_renderer_equals_the_per_item_reference_within_one_level():
    diffs = []
    for path in DEMO_IMAGES[:12]:
        image = decode_image(path.read_bytes(), 224)
        _, height, width = image.shape
        params = _params(width, height, path.name, 8)
        ours = render_views(image, params, 224, radius=max(1, math.ceil(3 * max(p.blur_sigma for p in params))))
        diffs.append((ours.int() - reference_render(image, params, 224).int()).abs())
    diff = torch.cat(diffs)
    assert diff.max() <= 1 and diff.float().mean() < 0.01, (diff.max(), diff.float().mean())


def test_views_become_uint8_as_clamp_round_and_cast_make_them():
    """The renderer's last step rounds by adding 2**23 and takes the float's low byte: the same bytes as
    clamp_(0, 255).round_().to(uint8), ties to even included, on every value a view can hold and beyond."""
    from mlprep.views import _to_uint8

    ties = torch.arange(-4, 520, dtype=torch.float32) / 2  # every half from -2 to 259.5
    near = torch.tensor([0.49999997, 0.50000006, 254.49998, 254.50002, 255.49998, 1e-30, -1e-30, -0.0, 255.0,
                         256.0, 1e9, float("inf"), float("-inf")])
    noise = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(3)) * 300 - 20
    for values in (ties, near, noise):
        assert torch.equal(_to_uint8(values.clone()), values.clone().clamp_(0, 255).round_().to(torch.uint8))


def test_a_view_does_not_depend_on_its_chunk_or_its_slot():
    images = [decode_image(p.read_bytes(), 224).float() for p in DEMO_IMAGES[:4]]
    images.append(torch.rand(3, 300, 401) * 255)  # a size of its own: another grid_sample group
    from mlprep.sku.augment import view_transforms

    transforms = [view_transforms(_params(i.shape[2], i.shape[1], f"item{k}", 6), i.shape[2], i.shape[1], 224)
                  for k, i in enumerate(images)]
    sizes = [(i.shape[2], i.shape[1]) for i in images]
    renderer = ViewRenderer(224, 6 * 5, CPU, "border", blur_radius(EVERY_STEP))
    alone, _ = renderer([images[0]], [transforms[0]], [sizes[0]])
    together, _ = renderer(images, transforms, sizes)
    assert torch.equal(alone[:6], together[:6])
    order = [4, 2, 0, 1, 3]  # item 0 now third, after an odd-sized image
    shuffled, _ = renderer([images[k] for k in order], [transforms[k] for k in order], [sizes[k] for k in order])
    assert torch.equal(shuffled[12:18], alone[:6])
    assert torch.equal(shuffled[:6], together[24:30])
    # an item without an image leaves no slot behind
    gap, counts = renderer([images[1], None, images[0]], [transforms[1], None, transforms[0]],
                           [sizes[1], (0, 0), sizes[0]])
    assert counts == [6, 0, 6] and torch.equal(gap[6:12], alone[:6])
    # the renderer's work space, reused chunk after chunk, carries nothing over: every slot as the first time
    again, _ = renderer([images[0]], [transforms[0]], [sizes[0]])
    assert torch.equal(again, alone)


def test_embeddings_are_bit_identical_whatever_the_split(tiny_clip):
    items = read_catalog(REPO / "resources/demo/sku/sku_data.json", REPO / "resources/demo/sku/images", 1).items[:10]
    encoder = ClipEncoder(ModelSpec.from_config(tiny_clip), CPU, torch.float32, 8)
    plan = ViewPlan(seed=3, augment_per_image=3, queries_per_image=1, settings=EVERY_STEP, image_size=64)
    whole = encode_items(items, plan, encoder, FailureLog(False), workers=0)
    parts = [encode_items(items[a:b], plan, encoder, FailureLog(False), workers=w) for (a, b), w in
             [((0, 3), 0), ((3, 4), 1), ((4, 10), 2)]]
    np.testing.assert_array_equal(np.concatenate([p.index_vectors for p in parts]), whole.index_vectors)
    np.testing.assert_array_equal(np.concatenate([p.query_vectors for p in parts]), whole.query_vectors)
    assert whole.index_meta["item_id"].tolist() == sum((p.index_meta["item_id"].tolist() for p in parts), [])


def test_bf16_embeddings_of_the_same_views_agree_with_fp32():
    items = read_catalog(REPO / "resources/demo/sku/sku_data.json", REPO / "resources/demo/sku/images", 1).items[:6]
    plan = ViewPlan(seed=3, augment_per_image=5, queries_per_image=0, settings=EVERY_STEP, image_size=224)
    views = render_items(items, plan, CPU)
    spec = ModelSpec("ViT-B-32", init_seed=11)
    fp32 = ClipEncoder(spec, CPU, torch.float32, 36).encode_images(views)
    bf16 = ClipEncoder(spec, CPU, torch.bfloat16, 36).encode_images(views)
    assert len(views) == 36 and (fp32 * bf16).sum(axis=1).min() >= 0.999


@pytest.mark.parametrize("size", [(1280, 960), (300, 233)])
def test_the_device_decoder_path_equals_the_cpu_decode_within_its_bound(size):
    data = _jpeg(_photo(size))
    cpu_item, cpu_views = _render_one(data, False)
    dev_item, dev_views = _render_one(data, True)
    assert not cpu_item.jpeg and dev_item.jpeg and dev_item.reduce == (4 if size[0] > 1000 else 1)
    diff = (cpu_views.int() - dev_views.int()).abs()
    assert diff.float().mean() < 0.5 and diff.max() < 24, (diff.float().mean(), diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_alike_by_both_decoders(orientation):
    image = _photo((480, 320))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(image, exif=exif)
    header = read_header(data)
    assert (header.width, header.height) == ((320, 480) if orientation >= 5 else (480, 320))
    cpu = decode_image(data, 224)  # PIL's exif_transpose
    assert cpu.shape[1:] == ((320, 480)[::-1] if orientation >= 5 else (320, 480))
    chunk = pack([prepare_image(0, data, 224, True, lambda w, h: None)])
    assert chunk.items[0].jpeg
    device = DeviceImages(CPU, 224)(chunk).image(0)
    assert device.shape == cpu.shape
    assert (device - cpu.float()).abs().mean() < 2.0


@pytest.mark.parametrize("size", [(64, 48), (100, 300), (223, 224), (224, 224), (225, 230), (447, 449), (900, 700)])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_device_decoder_keeps_every_image_the_cpu_keeps_smaller_equal_or_larger_than_the_input(size, orientation):
    """Found on a GPU: every JPEG with a side under the model's input was lost on the device decoder path
    (`StopIteration` in its size reduction), so a catalog of thumbnails failed whole."""
    from mlprep.views import device_reduction

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_photo(size), exif=exif)
    cpu_item, cpu_views = _render_one(data, False)
    dev_item, dev_views = _render_one(data, True)
    assert cpu_item.error is None and dev_item.error is None, (cpu_item.error, dev_item.error)
    assert dev_item.jpeg and dev_item.reduce == device_reduction(size, orientation, 224)
    assert dev_item.reduce == (1 if min(size) < 448 else 2)
    assert (dev_item.width, dev_item.height) == (cpu_item.width, cpu_item.height)
    diff = (cpu_views.int() - dev_views.int()).abs()
    assert diff.float().mean() < 0.5 and diff.max() < 24, (diff.float().mean(), diff.max())


def _cmyk_jpeg() -> bytes:
    return _jpeg(_photo((320, 240)).convert("CMYK"))


@pytest.mark.parametrize("name, make", [
    ("png", lambda: (lambda out: (_photo((320, 240)).save(out, format="PNG"), out.getvalue())[1])(io.BytesIO())),
    ("greyscale", lambda: _jpeg(_photo((320, 240)).convert("L"))),
    ("cmyk", _cmyk_jpeg),
    ("progressive", lambda: _jpeg(_photo((320, 240)), progressive=True)),
    ("data after the end marker", lambda: _jpeg(_photo((320, 240))) + b"trailer" * 100),
])
def test_what_the_device_decoder_cannot_take_is_decoded_by_the_cpu(name, make):
    data = make()
    prepared, views = _render_one(data, True)
    assert prepared.error is None and not prepared.jpeg, name
    assert views.shape == (6, 3, 224, 224) and views.float().std() > 5


def _saved(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def test_a_cut_out_product_is_laid_on_white_not_on_the_colour_under_its_transparent_pixels():
    """A product photo cut out on a transparent ground (PNG, WebP, GIF) keeps some colour under the transparent
    pixels, most often black: a plain conversion to RGB put the product on that black ground. It is laid on white,
    as shops show it, half-transparent pixels blended, in every decode the pipelines use; opaque images are not
    changed."""
    from mlprep.views import decode_within

    product = _photo((96, 64))
    alpha = Image.new("L", product.size, 0)
    alpha.paste(255, (24, 16, 72, 48))  # the product, opaque, on a transparent ground
    alpha.paste(128, (24, 8, 72, 16))  # a half-transparent strip
    black = Image.new("RGB", product.size, (0, 0, 0))
    black.paste(product.crop((24, 8, 72, 48)), (24, 8))  # under the transparent pixels: black
    cut_out = black.copy()
    cut_out.putalpha(alpha)
    palette = cut_out.convert("RGB").quantize(64)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the ground's palette entry is the transparent one
    expected = np.asarray(cut_out.convert("RGB")).astype(int)
    weight = np.asarray(alpha)[..., None] / 255
    expected = np.round(expected * weight + 255 * (1 - weight))
    for name, data in (("png", _saved(cut_out, "PNG")), ("webp", _saved(cut_out, "WEBP", lossless=True)),
                       ("greyscale png", _saved(cut_out.convert("LA"), "PNG"))):
        decoded = decode_image(data, 64).permute(1, 2, 0).numpy().astype(int)
        if name == "greyscale png":
            assert (decoded[np.asarray(alpha) == 0] == 255).all(), name
            continue
        assert np.abs(decoded - expected).max() <= 1, name
        assert np.abs(np.asarray(decode_within(data, "RGB", 96)).astype(int) - expected).max() <= 1, name
        assert (np.asarray(decode_within(data, "L", 96))[np.asarray(alpha) == 0] == 255).all(), name
    decoded = decode_image(_saved(palette, "GIF", transparency=palette.info["transparency"]), 64).numpy()
    assert (decoded[:, np.asarray(alpha) == 0] == 255).all()
    opaque = _saved(product, "PNG")
    assert np.array_equal(decode_image(opaque, 64).permute(1, 2, 0).numpy(), np.asarray(product))


def test_a_16_bit_greyscale_image_keeps_its_tones():
    """PIL converts 16-bit greyscale (a PNG or TIFF from a scanner) to RGB by clipping at 255: all but the darkest
    0.4% of tones came out white. It is brought to 8 bits by its range."""
    from mlprep.views import decode_within

    tones = np.linspace(0, 65535, 96 * 128).reshape(96, 128).astype(np.uint16)
    for data in (_saved(Image.fromarray(tones), "PNG"),
                 _saved(Image.frombytes("I;16B", (128, 96), tones.astype(">u2").tobytes()), "TIFF")):
        expected = (tones.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        decoded = decode_image(data, 96).numpy()
        assert all(np.array_equal(channel, expected) for channel in decoded)
        assert np.array_equal(np.asarray(decode_within(data, "L", 128)), expected)


def test_avif_decodes_and_heic_is_a_failure_that_says_what_it_is():
    """AVIF (web shops' product images) decodes; HEIC (the iPhone's photo format), for which no decoder is installed,
    is a not_an_image failure that names the format and what to do, not "not an image any decoder recognises"."""
    from mlprep.failures import ItemError

    photo = _photo((128, 96))
    decoded = decode_image(_saved(photo, "AVIF", quality=95), 64).permute(1, 2, 0).numpy().astype(int)
    assert decoded.shape == (96, 128, 3) and np.abs(decoded - np.asarray(photo)).mean() < 8
    with pytest.raises(ItemError, match="HEIC/HEIF image .* convert it to JPEG") as caught:
        decode_image(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), 64)
    assert caught.value.code == "not_an_image"


def test_a_broken_jpeg_and_a_decompression_bomb_are_failures(tmp_path):
    good = _jpeg(_photo((320, 240)))
    for device_decode in (False, True):  # cut short: no end marker, so both decode on the CPU and say why
        prepared, _ = prepare_image(0, good[:-2], 224, device_decode, lambda w, h: None)
        assert prepared.error[0] == "truncated"
    broken = good[:600] + bytes(range(256)) * 8 + b"\xff\xd9"  # a valid header, garbage, an end marker
    prepared, _ = prepare_image(0, broken, 224, True, lambda w, h: None)
    assert prepared.jpeg  # it looks like one the device decoder takes ...
    chunk = pack([(prepared, broken)])
    image = DeviceImages(CPU, 224)(chunk).image(0)
    assert image is None and chunk.items[0].error[0] in ("decode_error", "truncated")  # ... and fails in both
    for data, side in [(huge_png(50000), 50000), (huge_jpeg(65000), 65000)]:  # over Pillow's own limit
        for device_decode in (False, True):
            prepared, _ = prepare_image(0, data, 224, device_decode, lambda w, h: None)
            assert prepared.error[0] == "too_many_pixels", prepared.error  # the code the docs promise
            assert "decompression bomb" in prepared.error[1] and f"{side * side}" in prepared.error[1]


def huge_png(side: int) -> bytes:
    """A small PNG whose header claims side x side pixels."""
    png = io.BytesIO()
    Image.new("1", (8, 8)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    data[16:24] = side.to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def huge_jpeg(side: int) -> bytes:
    """A small JPEG whose frame header claims side x side pixels."""
    data = bytearray(_jpeg(Image.new("RGB", (16, 16), "red")))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
    return bytes(data)


def _chunk_of(n: int, device_decode: bool, views_per_item: int = 4):
    """n JPEGs of three sizes (one portrait), each with `views_per_item` views, packed as a worker packs them."""
    from mlprep.sku.augment import view_transforms

    sizes = [(320, 240), (240, 320), (500, 375)]
    prepared = []
    for k in range(n):
        data = _jpeg(_photo(sizes[k % 3]))
        prepared.append(prepare_image(k, data, 64, device_decode, lambda w, h, k=k: view_transforms(
            _params(w, h, f"item{k}", views_per_item), w, h, 64)))
    return pack(prepared)


VIEW_OPS = {"aten::slice", "aten::as_strided", "aten::view", "aten::select", "aten::narrow", "aten::empty",
            "aten::reshape", "aten::transpose", "aten::expand", "aten::alias", "aten::lift_fresh", "aten::detach"}


def _ops_of_one_chunk(stage, chunk) -> tuple[dict, torch.Tensor]:
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rendered, counts = stage.renderer(stage.images(chunk), [i.transforms for i in chunk.items],
                                          [(i.width, i.height) for i in chunk.items])
        vectors = stage.forward(rendered)
    ops = Counter()
    for event in prof.events():
        ops[event.name] += 1
    return ops, vectors[: sum(counts)]


@pytest.mark.parametrize("device_decode", [False, True])
def test_the_render_and_encode_of_a_chunk_issue_as_many_device_operations_whatever_its_images(tiny_clip,
                                                                                               device_decode):
    """The feed's shape, counted with torch.profiler on the CPU: a chunk's render and encode take the same device
    operations for 6 images as for 21 (CPU-decoded pixels arrive in the worker's canvases; JPEGs decoded by the
    device's decoder cost a decode each, then are reduced and placed a shape at a time), two host-to-device
    transfers (pixels, numbers) and nothing that waits for the device (no .item(), .cpu(), nonzero)."""
    from mlprep.views import ViewStage

    encoder = ClipEncoder(ModelSpec.from_config(tiny_clip), CPU, torch.float32, 24 * 4)
    stage = ViewStage(encoder, 4, 24)
    small, large = _chunk_of(6, device_decode), _chunk_of(21, device_decode)
    _ops_of_one_chunk(stage, small)  # warm
    few, few_vectors = _ops_of_one_chunk(stage, small)
    many, many_vectors = _ops_of_one_chunk(stage, large)
    syncs = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist"}
    assert not syncs & (set(few) | set(many))
    assert few["mlprep::host_to_device"] == many["mlprep::host_to_device"] == (1 if device_decode else 2)
    grown = {name: many[name] - few[name] for name in many if many[name] != few[name]}
    if device_decode:  # only the decoder works per image: conversion, reduction and placement go a shape at a time
        compute = {name: n for name, n in grown.items() if name not in VIEW_OPS}
        # torchvision's CPU decoder decodes one by one and returns a permuted copy (CUDA's takes the list at once)
        decoder = {"image::decode_jpeg", "aten::permute", "aten::contiguous", "aten::clone", "aten::empty_like"}
        assert "image::decode_jpeg" in compute and set(compute) <= decoder, str(compute)
    else:
        assert grown == {}, grown
    np.testing.assert_array_equal(few_vectors.numpy(), many_vectors[: len(few_vectors)].numpy())


@pytest.mark.parametrize("mode", ["border", "zeros", "reflection"])
def test_every_padding_mode_samples_as_grid_sample_does_on_the_image_alone(mode):
    """Views warped beyond the photo show what the padding mode says, though the image lies in a larger canvas."""
    from mlprep.sku.augment import view_transforms

    image = torch.from_numpy(np.array(_photo((300, 233)))).permute(2, 0, 1).float()
    settings = AugmentSettings(rotation_deg=40, crop_scale=(0.3, 1.0), perspective=0.4, brightness=0, contrast=0,
                               saturation=0, hue=0, blur_prob=0, padding_mode=mode)
    params = [sample_view(settings, 5, "s", "x", k, 300, 233) for k in range(1, 9)]
    ours, _ = ViewRenderer(96, 8, CPU, mode)([image], [view_transforms(params, 300, 233, 96)], [(300, 233)])
    matrices = view_matrices(params, 300, 233, 96)
    centres = np.arange(96, dtype=np.float64) + 0.5
    gx, gy = np.meshgrid(centres, centres)
    mapped = matrices @ np.stack([gx.ravel(), gy.ravel(), np.ones(96 * 96)])
    grid = np.stack([2 * mapped[:, 0] / mapped[:, 2] / 300 - 1, 2 * mapped[:, 1] / mapped[:, 2] / 233 - 1], -1)
    grid = torch.from_numpy(grid.reshape(8, 96, 96, 2).astype(np.float32))
    reference = F.grid_sample(image[None].expand(8, -1, -1, -1), grid, padding_mode=mode, align_corners=False)
    diff = (ours.int() - reference.round().clamp(0, 255).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01, (diff.max(), diff.float().mean())
