"""CLIP encoder wrapper over open_clip: batched, fixed-shape, L2-normalised float32 output.

open_clip is imported where a model is built, not with this module (it costs ~2 s, most of it torchvision
and torch._dynamo): a shard job starts its readers first and imports it while they read."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import json
from importlib.util import find_spec

import numpy as np
import torch
import torch.nn.functional as F

from mlprep.config import looks_like_path
from mlprep.devices import job_device, precision_name, select_precision
from mlprep.rng import derive_seed

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "!!! CLIP model %r runs with RANDOM weights (no `pretrained` set): embeddings carry no semantics. "
    "Set `pretrained` of the model's config (sku_index.model, kline_factor.chart.model, probe_qa.probe.model) to a "
    "local checkpoint path or an open_clip tag to get real ones."
)


@dataclass(frozen=True)
class ClipSpec:
    """Which model to build: an open_clip name, optional weights (tag or local file), optional config JSON."""

    name: str = "ViT-B-32"
    pretrained: str | None = None
    config_file: str | None = None
    init_seed: int = 0  # seeds random weights, so that every shard job builds the same random model

    @classmethod
    def from_config(cls, cfg: dict, seed: int = 0) -> ClipSpec:
        init_seed = derive_seed(seed, "clip-random-init") % 2**63
        return cls(cfg.get("name", "ViT-B-32"), cfg.get("pretrained") or None, cfg.get("config_file") or None, init_seed)


def _config_path(spec: ClipSpec) -> Path:
    if spec.config_file:
        config_path = Path(spec.config_file)
        if not config_path.is_file():
            raise FileNotFoundError(f"open_clip model config {config_path} does not exist")
        return config_path
    return Path(find_spec("open_clip").origin).parent / "model_configs" / f"{spec.name}.json"


def _register_config(spec: ClipSpec) -> None:
    import open_clip

    if spec.config_file:
        open_clip.add_model_config(_config_path(spec))


def clip_image_size(spec: ClipSpec) -> int | None:
    """The model's input size from its architecture config file, without importing open_clip or building the
    model (None where only the built model knows: hub models). Lets a shard job start its readers first."""
    path = _config_path(spec)
    if not path.is_file():
        return None
    size = json.loads(path.read_text()).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class ClipEncoder:
    """Encodes uint8 images and texts with one open_clip model on one device at one precision.

    Every forward pass has exactly `batch_size` rows (the last batch is padded): a row's embedding
    then never depends on which other rows shared its batch, so results are identical whatever the
    shard count.
    """

    def __init__(self, spec: ClipSpec, device: torch.device, dtype: torch.dtype, batch_size: int = 32):
        import open_clip

        _register_config(spec)
        if spec.name not in open_clip.list_models() and not spec.name.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"unknown open_clip model {spec.name!r} (give config_file for a custom architecture)")
        if spec.pretrained and looks_like_path(spec.pretrained) and not Path(spec.pretrained).is_file():
            raise FileNotFoundError(f"CLIP checkpoint {spec.pretrained} does not exist")
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(spec.init_seed)
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained, device=device)
        if not spec.pretrained and not spec.name.startswith(("hf-hub:", "local-dir:")):
            log.warning(RANDOM_WEIGHTS_WARNING, spec.name)
        self.model = model.eval().to(dtype=dtype)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self._scale = (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1).to(device)
        self._shift = (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1).to(device)
        self._tokenizer = None
        log.info(
            "CLIP %s on %s at %s, batch %d, image %d px",
            spec.name,
            device,
            precision_name(dtype),
            batch_size,
            self.image_size,
        )

    @property
    def dim(self) -> int:
        out_dim = getattr(self.model.visual, "output_dim", None)
        if out_dim:
            return int(out_dim)
        blank = torch.zeros(1, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return int(self.encode_images(blank).shape[1])

    def _padded_batches(self, rows: torch.Tensor):
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                pad = chunk[:1].expand(self.batch_size - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            yield chunk, n

    @torch.inference_mode()
    def encode_device(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, S, S] RGB (on any device) -> float32 [N, D], L2-normalised, left on the model's device:
        nothing here waits for the device, so the caller's next work overlaps with these forward passes."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        out = []
        for chunk, n in self._padded_batches(images):
            pixels = chunk.to(self.device, non_blocking=True).float() * self._scale - self._shift
            features = self.model.encode_image(pixels.to(self.dtype))[:n]
            out.append(F.normalize(features.float(), dim=-1))
        if not out:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        return torch.cat(out) if len(out) > 1 else out[0]

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [N, 3, S, S] RGB -> float32 [N, D] on the host, L2-normalised."""
        return self.encode_device(images).cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 [N, D], L2-normalised."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.spec.name)
        tokens = self._tokenizer(texts)
        out = []
        for chunk, n in self._padded_batches(tokens):
            features = self.model.encode_text(chunk.to(self.device))[:n]
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def load_clip_encoder(model_cfg: dict, batch_size: int, device_spec: str, precision_spec: str, threads: int,
                      seed: int) -> ClipEncoder:
    """A shard job's encoder on the job's device (mlprep.devices.job_device) at the precision the config asks for."""
    device = job_device(device_spec, threads)
    return ClipEncoder(ClipSpec.from_config(model_cfg, seed), device, select_precision(precision_spec, device),
                       batch_size)
