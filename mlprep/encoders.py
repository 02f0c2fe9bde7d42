"""Image encoders: open_clip models (image and text towers) and any timm image model, batched, fixed-shape,
L2-normalised float32 output.

`model` in the config names the family (`open_clip`, the default, or `timm`), the architecture and its
weights: an open_clip tag, a local checkpoint file, or weights a Python package ships (`packaged:<name>`, see
mlprep.weights), so that a real pretrained model runs offline. A timm model brings its own input size and
normalisation (timm's pretrained config of the architecture); its embedding is its feature map pooled as
`model.pooling` says (POOLINGS: the model's own head, or GeM, or regional maxima), L2-normalised, and its
classifier's logits serve probe_qa's `classifier` probe.

The model libraries are imported where a model is built, not with this module (open_clip costs ~2 s, most of
it torchvision and torch._dynamo): a shard job starts its readers first and imports them while they read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlprep.config import looks_like_path
from mlprep.devices import job_device, precision_name, select_precision
from mlprep.rng import derive_seed
from mlprep.weights import PackagedWeightsError, is_packaged, packaged, packaged_file

log = logging.getLogger(__name__)

FAMILIES = ("open_clip", "timm")
RANDOM_WEIGHTS_WARNING = (
    "!!! %s model %r runs with RANDOM weights (no `pretrained` set): embeddings carry no semantics. "
    "Set `pretrained` of the model's config (sku_index.model, kline_factor.chart.model, probe_qa.probe.model) to a "
    "local checkpoint, an open_clip tag or packaged weights (packaged:efficientnet-lite0) to get real ones."
)


# how a timm model's feature map [N, C, H, W] becomes its embedding: `model` its own head (average pooling for
# most CNNs, the class token for ViTs); `gem` generalised mean (p = 3) over the map; `multiscale` the maxima of 1,
# 2x2 and 3x3 regions, each L2-normalised, summed; `auto` GeM where the model gives a map (measured better on
# look-alike products: docs/sku_index.md), its own head otherwise
POOLINGS = ("auto", "model", "gem", "multiscale")
GEM_P = 3.0


class ModelError(ValueError):
    """A model config that cannot be built; the message names the key or file."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build: family, architecture, optional weights, optional architecture config (open_clip)."""

    name: str = "ViT-B-32"
    pretrained: str | None = None
    config_file: str | None = None
    init_seed: int = 0  # seeds random weights, so that every shard job builds the same random model
    family: str = "open_clip"
    pooling: str = "model"  # timm: how the feature map becomes the embedding (POOLINGS)

    @classmethod
    def from_config(cls, cfg: dict, seed: int = 0) -> ModelSpec:
        family = cfg.get("family") or "open_clip"
        if family not in FAMILIES:
            raise ModelError(f"model.family: {family!r} is not one of {', '.join(FAMILIES)}")
        pretrained = cfg.get("pretrained") or None
        name = cfg.get("name")
        if is_packaged(pretrained):
            entry = packaged(pretrained)
            if family != entry.family:
                raise ModelError(f"model.pretrained: {pretrained} holds {entry.family} weights, model.family is "
                                 f"{family}")
            if name and name != entry.arch:
                raise ModelError(f"model.pretrained: {pretrained} holds {entry.arch} weights, not {name!r} "
                                 f"(set model.name: {entry.arch}, or leave it out)")
            name = entry.arch
        if not name:
            if family != "open_clip":
                raise ModelError("model.name: a timm model needs its architecture name (e.g. tf_efficientnet_lite0)")
            name = "ViT-B-32"
        pooling = cfg.get("pooling") or "model"  # sku_index's schema sets auto; other pipelines keep the head
        if pooling not in POOLINGS:
            raise ModelError(f"model.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        if family == "open_clip" and pooling not in ("auto", "model"):
            raise ModelError(f"model.pooling: {pooling} is for timm models; an open_clip model's embedding is its own "
                             f"(set model.pooling: auto)")
        init_seed = derive_seed(seed, "clip-random-init") % 2**63
        return cls(name, pretrained, cfg.get("config_file") or None, init_seed, family,
                   "model" if family == "open_clip" else pooling)


def checkpoint_path(spec: ModelSpec) -> Path | None:
    """The local file the weights come from (a path, or packaged weights' file), None for a tag or none."""
    if not spec.pretrained:
        return None
    if is_packaged(spec.pretrained):
        try:
            return packaged_file(spec.pretrained)
        except PackagedWeightsError as err:
            raise ModelError(f"model.pretrained: {err}") from err
    if looks_like_path(spec.pretrained):
        path = Path(spec.pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint {path} does not exist")
        return path
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(spec: ModelSpec) -> dict:
    """What made a shard's vectors: family, architecture, weights and the checkpoint file's SHA-256 (random
    weights: the seed that drew them). Shards of one index must all have the same identity."""
    path = checkpoint_path(spec)
    out = {"family": spec.family, "name": spec.name, "pretrained": spec.pretrained,
           "config_file": spec.config_file, "checkpoint_sha256": file_sha256(path) if path else None,
           "random_init_seed": None if spec.pretrained else spec.init_seed}
    return out | ({"pooling": spec.pooling} if spec.pooling != "model" else {})


def _clip_config_path(spec: ModelSpec) -> Path:
    if spec.config_file:
        config_path = Path(spec.config_file)
        if not config_path.is_file():
            raise FileNotFoundError(f"open_clip model config {config_path} does not exist")
        return config_path
    return Path(find_spec("open_clip").origin).parent / "model_configs" / f"{spec.name}.json"


def image_size_of(spec: ModelSpec) -> int | None:
    """The model's input size without building it or importing its library, where a file or table says it
    (None otherwise: the size is then known once the model is built). Lets a shard job start its readers first."""
    if spec.family == "timm":
        return 224 if is_packaged(spec.pretrained) else None
    path = _clip_config_path(spec)
    if not path.is_file():
        return None
    size = json.loads(path.read_text()).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ImageEncoder:
    """Encodes uint8 images with one model on one device at one precision.

    Every forward pass has exactly `batch_size` rows (the last batch is padded): a row's embedding then never
    depends on which other rows shared its batch, so results are identical whatever the shard count.
    """

    family = ""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch_size: int,
                 image_size: int, mean, std, dim: int):
        self.spec, self.device, self.dtype, self.batch_size = spec, device, dtype, batch_size
        self.image_size, self.dim = image_size, dim
        self._scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, 3, 1, 1).to(device)
        self._shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, 3, 1, 1).to(device)
        if not spec.pretrained and not spec.name.startswith(("hf-hub:", "local-dir:")):
            log.warning(RANDOM_WEIGHTS_WARNING, self.family, spec.name)
        log.info("%s %s on %s at %s, batch %d, image %d px, %d-dim", self.family, spec.name, device,
                 precision_name(dtype), batch_size, image_size, dim)

    def identity(self) -> dict:
        return model_identity(self.spec)

    def _padded_batches(self, rows: torch.Tensor):
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = chunk[:1].expand(self.batch_size - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            yield chunk, n

    def _pixels(self, chunk: torch.Tensor) -> torch.Tensor:
        return (chunk.to(self.device, non_blocking=True).float() * self._scale - self._shift).to(self.dtype)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def _run(self, images: torch.Tensor, forward, normalize: bool, width: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        out = []
        for chunk, n in self._padded_batches(images):
            rows = forward(self._pixels(chunk))[:n].float()
            out.append(F.normalize(rows, dim=-1) if normalize else rows)
        if not out:
            return torch.zeros((0, width), dtype=torch.float32, device=self.device)
        return torch.cat(out) if len(out) > 1 else out[0]

    def encode_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] RGB (on any device) -> float32 [N, D], L2-normalised, left on the model's device:
        nothing here waits for the device, so the caller's next work overlaps with these forward passes."""
        return self._run(images, self._features, True, self.dim)

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [N, 3, S, S] RGB -> float32 [N, D] on the host, L2-normalised."""
        return self.encode_device(images).cpu().numpy().astype(np.float32, copy=False)

    def warm_up(self, on_cpu: bool = False) -> bool:
        """On a GPU, one forward pass of a batch of zeros, waited for: every batch has this one shape, so the
        kernels the job runs are loaded (and its math libraries' handles made) while the readers, started before the
        model was built, fill the first chunk, instead of after it. Changes nothing a later batch computes
        (inference mode, no state). On a CPU it would cost a batch's work for little: False, nothing done, unless
        `on_cpu` (tests)."""
        if self.device.type != "cuda" and not on_cpu:
            return False
        size = self.image_size
        self.encode_device(torch.zeros((self.batch_size, 3, size, size), dtype=torch.uint8, device=self.device)).cpu()
        return True


class ClipEncoder(ImageEncoder):
    """An open_clip model: images (and texts, for zero-shot) into its joint embedding space."""

    family = "open_clip"

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch_size: int = 32,
                 text: bool = True):
        """`text=False` for a job that embeds images only: the text tower is left out (never read from the
        checkpoint or put on the device; encode_texts then refuses)."""
        import open_clip

        if spec.config_file:
            open_clip.add_model_config(_clip_config_path(spec))
        if spec.name not in open_clip.list_models() and not spec.name.startswith(("hf-hub:", "local-dir:")):
            raise ModelError(f"unknown open_clip model {spec.name!r} (give config_file for a custom architecture)")
        path = checkpoint_path(spec)
        model = _clip_with_weights(spec, path, device, text) if path is not None else None
        self.built_in_place = model is not None  # no random init, weights loaded straight onto the device
        if model is None:  # random weights (seeded), a hub tag, or a checkpoint that needs open_clip's conversions
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
                torch.manual_seed(spec.init_seed)
                model = open_clip.create_model(spec.name, pretrained=str(path) if path else spec.pretrained,
                                               device=device)
            if not text:
                _drop_text_tower(model)
        self.has_text = text
        self.model = model.eval().to(dtype=dtype)
        size = model.visual.image_size
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        dim = getattr(model.visual, "output_dim", None)
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if not dim:
            with torch.inference_mode():
                dim = model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype)).shape[1]
        super().__init__(spec, device, dtype, batch_size, image_size, mean, std, int(dim))
        self._tokenizer = None

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 [N, D], L2-normalised."""
        if not self.has_text:
            raise ModelError(f"open_clip {self.spec.name} was built for images only, without its text tower "
                             f"(build it with text=True)")
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.spec.name)
        tokens = self._tokenizer(texts)
        out = []
        for chunk, n in self._padded_batches(tokens):
            features = self.model.encode_text(chunk.to(self.device))[:n]
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def _state_dict(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """A checkpoint's tensors: a plain state dict, or one under state_dict/model/state_dict_ema, `module.` dropped.
    `mmap`: mapped from the file on the CPU, so that a tensor never used is never read (a checkpoint in the legacy
    format, which cannot be mapped, is read whole)."""
    try:
        data = torch.load(path, map_location="cpu" if mmap else device, weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path}: not a checkpoint of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _by_order(model: torch.nn.Module, tensors: dict, source: str) -> dict:
    """Packaged weights keyed in another package's names: matched to the model's parameters and buffers by
    order, every shape checked."""
    state = model.state_dict()  # once: building it walks every module (1.2 s a call for EfficientNet-Lite0)
    mine = [k for k in state if not k.endswith("num_batches_tracked")]
    theirs = [(k, v) for k, v in tensors.items() if not k.endswith("num_batches_tracked")]
    if len(mine) != len(theirs):
        raise ModelError(f"{source}: {len(theirs)} tensors, the model has {len(mine)}")
    out = {}
    for name, (key, value) in zip(mine, theirs):
        if state[name].shape != value.shape:
            raise ModelError(f"{source}: {key} {tuple(value.shape)} does not fit {name} {tuple(state[name].shape)}")
        out[name] = value
    return out


def _load_weights(model: torch.nn.Module, spec: ModelSpec, path: Path, assign: bool,
                  device: torch.device | str = "cpu") -> None:
    tensors = _state_dict(path, device)
    if is_packaged(spec.pretrained):
        tensors = _by_order(model, tensors, spec.pretrained)
    try:
        model.load_state_dict(tensors, strict=True, assign=assign)
    except RuntimeError as err:
        raise ModelError(f"{path}: does not fit timm's {spec.name}: {str(err)[:400]}") from err


def _clip_with_weights(spec: ModelSpec, path: Path, device: torch.device, text: bool) -> torch.nn.Module | None:
    """An open_clip model built on the meta device with a checkpoint that fits it exactly (every name and shape, as
    open_clip's training saves them) loaded straight onto `device` and put in place: the random init that the
    checkpoint would overwrite is skipped. The text tower's causal mask, which no checkpoint holds, is rebuilt;
    with `text` False the text tower is left out, its tensors never read from the mapped file. None for a
    checkpoint that needs open_clip's own loader (an OpenAI archive, older text-tower names, position embeddings
    of another size): the caller then uses it."""
    import logging

    import open_clip

    try:
        tensors = _state_dict(path, mmap=True)
    except Exception:  # noqa: BLE001 - not a plain state dict (a TorchScript archive): open_clip's loader decides
        return None
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "initialized randomly" warning is not true of this build
    try:
        with torch.device("meta"):
            model = open_clip.create_model(spec.name, device="meta")
    finally:
        root.setLevel(level)
    state = model.state_dict()
    if state.keys() != tensors.keys() or any(state[k].shape != tensors[k].shape for k in state):
        return None
    if not text:
        _drop_text_tower(model)
    # only what the model keeps is read from the file, each tensor copied once, onto the device
    model.load_state_dict({k: tensors[k].to(device, copy=True) for k in model.state_dict()}, strict=True, assign=True)
    for module in model.modules():  # open_clip registers a text mask only when causal: -inf above the diagonal
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.is_meta and mask.ndim == 2 and mask.shape[0] == mask.shape[1]:
            causal = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=device).triu_(1)
            module.register_buffer("attn_mask", causal, persistent=False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


def _drop_text_tower(model: torch.nn.Module) -> None:
    """An open_clip model left with what encode_image uses: its image tower (and the logit scale and bias, a number
    each); every other part of it, the text tower, is removed."""
    for name in [n for n in model._modules if n != "visual"]:
        delattr(model, name)
    for name in [n for n in model._parameters if n not in ("logit_scale", "logit_bias")]:
        delattr(model, name)
    for name in list(model._buffers):
        delattr(model, name)


def _timm_with_weights(spec: ModelSpec, path: Path, device: torch.device) -> torch.nn.Module | None:
    """The model built without initialising it (on the meta device) and its checkpoint's tensors, loaded straight
    onto `device`, put in place: no random init that the checkpoint overwrites, no copy of the weights. None when a
    tensor is left unset (a buffer the checkpoint does not hold): the caller then builds it the usual way."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(spec.name, pretrained=False)
    _load_weights(model, spec, path, assign=True, device=device)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


class TimmEncoder(ImageEncoder):
    """A timm image model: embeddings are its pooled features (before the classifier), L2-normalised; `logits`
    gives its classifier's output. Input size and normalisation come from timm's pretrained config of the
    architecture."""

    family = "timm"

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch_size: int = 32):
        import timm

        if not timm.is_model(spec.name):
            raise ModelError(f"model.name: {spec.name!r} is not a timm model (timm.list_models() has them)")
        path = checkpoint_path(spec)
        if spec.pretrained and path is None:
            raise ModelError(f"model.pretrained: {spec.pretrained!r} is no local file and no packaged weights "
                             f"(timm hub tags cannot be fetched here)")
        model = _timm_with_weights(spec, path, device) if path is not None else None
        self.built_in_place = model is not None  # no random init, weights loaded straight onto the device
        if model is None:  # random weights (seeded), or a checkpoint that leaves tensors unset
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.init_seed)
                model = timm.create_model(spec.name, pretrained=False)
            if path is not None:
                _load_weights(model, spec, path, assign=False)
        cfg = model.pretrained_cfg
        size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self.model = model.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        spec = replace(spec, pooling=self._resolve_pooling(spec, size, device, dtype))
        super().__init__(spec, device, dtype, batch_size, size, cfg.get("mean", (0.485, 0.456, 0.406)),
                         cfg.get("std", (0.229, 0.224, 0.225)), int(model.num_features))

    def _resolve_pooling(self, spec: ModelSpec, size: int, device: torch.device, dtype: torch.dtype) -> str:
        """`auto` -> gem where the model gives a feature map, model otherwise; gem or multiscale on a model without
        a map is the config's error."""
        if spec.pooling == "model":
            return "model"
        with torch.inference_mode():
            shape = self.model.forward_features(torch.zeros(1, 3, size, size, device=device, dtype=dtype)).shape
        if len(shape) == 4 and shape[1] == self.model.num_features:
            return "gem" if spec.pooling == "auto" else spec.pooling
        if spec.pooling == "auto":
            return "model"
        raise ModelError(f"model.pooling: {spec.pooling} needs a feature map, and {spec.name} gives "
                         f"{tuple(shape)} (set model.pooling: auto or model)")

    def _pixels(self, chunk: torch.Tensor) -> torch.Tensor:
        return super()._pixels(chunk).contiguous(memory_format=torch.channels_last)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixels)
        if self.spec.pooling == "gem":
            return gem(features)
        if self.spec.pooling == "multiscale":
            return multiscale_max(features)
        return self.model.forward_head(features, pre_logits=True)

    def logits_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] -> the classifier's logits float32 [N, classes], on the model's device."""
        if not self.num_classes:
            raise ModelError(f"timm model {self.spec.name} has no classifier head")
        return self._run(images, self.model, False, self.num_classes)

    def class_names(self) -> list[str]:
        """The classifier's class names: ImageNet-1k's (timm's own list) for a 1000-class head."""
        if self.num_classes != 1000:
            raise ModelError(f"{self.spec.name} has {self.num_classes} classes: give probe.classes as indices")
        from mlprep.probe.labels import imagenet_class_names

        return imagenet_class_names()


def gem(features: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    """Generalised mean over each channel of a [N, C, H, W] map, in float32: p = 1 is the average, large p the
    maximum; p = 3 weighs the strong local responses that tell look-alike products apart."""
    return features.float().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def multiscale_max(features: torch.Tensor) -> torch.Tensor:
    """The maxima of the whole map and of its 2x2 and 3x3 regions, each L2-normalised, summed (regional maximum
    activations at three scales), in float32."""
    features = features.float()
    out = 0
    for n in (1, 2, 3):
        regions = F.adaptive_max_pool2d(features, n).flatten(2)  # [N, C, n*n]
        out = out + F.normalize(regions, dim=1).sum(dim=2)
    return out


def build_encoder(spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch_size: int,
                  text: bool = False) -> ImageEncoder:
    """The image encoder of `spec`; an open_clip model with its text tower only where `text` (zero-shot)."""
    if spec.family == "timm":
        return TimmEncoder(spec, device, dtype, batch_size)
    return ClipEncoder(spec, device, dtype, batch_size, text=text)


def load_image_encoder(model_cfg: dict, batch_size: int, device_spec: str, precision_spec: str, threads: int,
                       seed: int) -> ImageEncoder:
    """A shard job's encoder on the job's device (mlprep.devices.job_device) at the precision the config asks for."""
    device = job_device(device_spec, threads)
    return build_encoder(ModelSpec.from_config(model_cfg, seed), device, select_precision(precision_spec, device),
                         batch_size)
