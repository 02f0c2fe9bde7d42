"""The offline image probes, each image against the dataset's label set:

- `clip_zero_shot`: each label becomes a prompt from `prompt_template` ("a photo of a {label}."); the prompts are
  encoded once, each image's embedding is compared with all of them, and the best label is the prediction, with
  its softmax probability (CLIP's logit scale) as the score.
- `classifier`: an image classifier (a timm model; the demo's is ImageNet EfficientNet-Lite0) whose own classes
  stand for the labels: a label is the class of its name, or the classes `probe.classes` maps it to; a label's
  probability is the softmax mass of its classes, and the prediction the most probable label of the set (score:
  its share of the set's mass). Its failures are a real model's real mistakes.

Images take sku_index's path (mlprep.views): CPU workers read the shard's row groups (each worker its own, one
row group in memory at a time) and decode or pass JPEGs on; on the model's device each image becomes one view,
the centre square crop (the same view sku_index indexes as view 0 and searches with), and views are encoded or
classified in batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mlprep.failures import FailureLog, ItemError
from mlprep.probe.labels import label_classes
from mlprep.probe.reader import image_bytes, read_row_group, row_group_id, row_id
from mlprep.sku.augment import original_view, view_transforms
from mlprep.sources import join
from mlprep.views import PreparedChunk, PreparedImage, ViewStage, iter_chunks, pack, prepare_image
from mlprep.workers import each_in_threads

PROBE_COLUMNS = ["item_id", "id", "file", "row_group", "group_row", "row", "label", "prediction", "score", "correct"]
PROBE_DTYPES = {"item_id": "str", "id": "object", "file": "str", "row_group": "int64", "group_row": "int64",
                "row": "int64", "label": "str", "prediction": "str", "score": "float64", "correct": "bool"}


@dataclass
class ZeroShot:
    encoder: object  # mlprep.encoders.ClipEncoder
    labels: list[str]
    template: str = "a photo of a {label}."

    def __post_init__(self) -> None:
        if not hasattr(self.encoder, "encode_texts"):
            raise ValueError(f"probe_qa.probe.backend clip_zero_shot needs a model with a text tower (open_clip); "
                             f"{self.encoder.spec.name} has none: use backend classifier")
        self.text = self.encoder.encode_texts([self.template.format(label=label) for label in self.labels])
        logit_scale = getattr(self.encoder.model, "logit_scale", None)  # CLIP's learned temperature
        self.scale = float(logit_scale.detach().exp()) if logit_scale is not None else 100.0
        self.forward = self.encoder.encode_device

    def classify(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image embeddings [n, D] -> (label index, probability of it) per image."""
        if not len(vectors):
            return np.zeros(0, np.int64), np.zeros(0)
        logits = self.scale * (vectors @ self.text.T)
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        best = prob.argmax(axis=1)
        return best, prob[np.arange(len(best)), best]


@dataclass
class Classifier:
    encoder: object  # mlprep.encoders.TimmEncoder
    labels: list[str]
    mapping: dict | None = None

    def __post_init__(self) -> None:
        if not hasattr(self.encoder, "logits_device"):
            raise ValueError(f"probe_qa.probe.backend classifier needs an image classifier (a timm model); "
                             f"{self.encoder.spec.name} is {self.encoder.family}: use backend clip_zero_shot")
        self.members = label_classes(self.labels, self.encoder.class_names(), self.mapping)
        self.forward = self.encoder.logits_device

    def classify(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classifier logits [n, classes] -> (label index, its share of the label set's probability) per image."""
        if not len(logits):
            return np.zeros(0, np.int64), np.zeros(0)
        logits = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        mass = np.stack([prob[:, members].sum(axis=1) for members in self.members], axis=1)
        mass /= np.maximum(mass.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        best = mass.argmax(axis=1)
        return best, mass[np.arange(len(best)), best]


def probe_table(tags: list[tuple], labels: list[str], ids: list, predictions: list[str],
                scores: list[float]) -> pd.DataFrame:
    """PROBE_COLUMNS for probed rows tagged (file, row group, the group's first row, row in the group), with the
    dataset's own ids (None where it has none); the same column types when there is no row at all."""
    files = [t[0] for t in tags]
    rows = [t[2] + t[3] for t in tags]
    return pd.DataFrame({"item_id": [row_id(f, r) for f, r in zip(files, rows)], "id": list(ids), "file": files,
                         "row_group": [t[1] for t in tags], "group_row": [t[3] for t in tags], "row": rows,
                         "label": labels, "prediction": predictions, "score": [float(s) for s in scores],
                         "correct": [a == b for a, b in zip(labels, predictions)]},
                        columns=PROBE_COLUMNS).astype(PROBE_DTYPES)


def dataset_id(value) -> str | None:
    """A row's own id as text (None for a null cell, or a file without the id column)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


class ProbeImages(torch.utils.data.IterableDataset):
    """The shard's row groups read and prepared by CPU workers (worker i takes every n-th group), in chunks of
    `chunk` images; a row group that does not read is a chunk carrying its error. Tags are (file, row group,
    the group's first row, row in the group); each item's `extra` is its label."""

    def __init__(self, root: Path | str, groups: pd.DataFrame, labels: list[str], size: int, chunk: int,
                 device_decode: bool, image_column: str = "image", label_column: str = "label", images_dir=None,
                 id_column: str = "id", storage: dict | None = None):
        self.root, self.size, self.chunk, self.device_decode = str(root), size, chunk, device_decode
        self.storage = storage
        self.groups = list(zip(groups["file"], groups["row_group"].astype(int), groups["first_row"].astype(int)))
        self.labels = set(labels)
        self.columns, self.images_dir, self.id_column = [image_column, label_column], images_dir, id_column

    def _views(self, width: int, height: int):
        return view_transforms([original_view(width, height)], width, height, self.size)

    def _prepare(self, tag: tuple, cell, label, own_id) -> tuple[PreparedImage, bytes]:
        extra = (str(label), dataset_id(own_id))
        try:
            if str(label) not in self.labels:
                raise ItemError("bad_record", f"label {label!r} is not in the label set")
            data = image_bytes(cell, self.images_dir)
        except ItemError as err:
            return PreparedImage(tag, error=(err.code, str(err)), extra=extra), b""
        return prepare_image(tag, data, self.size, self.device_decode, self._views, extra=extra)

    def __iter__(self) -> Iterator[PreparedChunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for file, group, first in self.groups[worker::workers]:
            try:
                frame = read_row_group(self.root, file, group, self.columns, (self.id_column,), self.storage)
            except ItemError as err:
                chunk = pack([])
                chunk.items, chunk.error = [PreparedImage((file, group, first, None))], (err.code, str(err))
                yield chunk
                continue
            images, labels = frame[self.columns[0]], frame[self.columns[1]]
            ids = frame[self.id_column] if self.id_column in frame else pd.Series([None] * len(frame))
            for start in range(0, len(frame), self.chunk):
                stop = min(len(frame), start + self.chunk)
                yield pack(each_in_threads(  # runs here, before the loop moves on: the names it reads stay
                    lambda row: self._prepare((file, group, first, row), images.iat[row], labels.iat[row],
                                              ids.iat[row]), range(start, stop)))


def probe_rows(root: Path | str, groups: pd.DataFrame, probe: ZeroShot | Classifier, failures: FailureLog,
               image_column: str = "image", label_column: str = "label", images_dir=None, workers: int = 0,
               jpeg_decoder: str = "auto", chunks: Iterator[PreparedChunk] | None = None,
               on_encoded=None, id_column: str = "id", storage: dict | None = None) -> Iterator[pd.DataFrame]:
    """PROBE_COLUMNS of the probed rows of `groups`, part by part (streamed: memory stays bounded); bad row
    groups and images are recorded in `failures`, a label outside the label set as `bad_record`."""
    encoder = probe.encoder
    if chunks is None:
        chunks = probe_chunks(root, groups, probe.labels, encoder.image_size, encoder.batch_size, workers,
                              encoder.device, jpeg_decoder, image_column, label_column, images_dir, id_column,
                              storage)
    stage = ViewStage(encoder, 1, encoder.batch_size, forward=probe.forward)
    for part in stage.stream(chunks, on_encoded=on_encoded):
        for item in part.failed:
            file, group, first, row = item.tag
            if row is None:
                failures.record(row_group_id(file, group), join(root, file), "read", *item.error)
            else:
                failures.record(row_id(file, first + row), join(root, file), "probe", *item.error,
                                own_id=item.extra[1] if item.extra else None)
        best, score = probe.classify(part.vectors)
        yield probe_table([i.tag for i in part.items], [i.extra[0] for i in part.items],
                          [i.extra[1] for i in part.items], [probe.labels[k] for k in best], score.tolist())


def probe_chunks(root: Path | str, groups: pd.DataFrame, labels: list[str], size: int, batch_size: int,
                 workers: int, device: torch.device, jpeg_decoder: str = "auto", image_column: str = "image",
                 label_column: str = "label", images_dir=None, id_column: str = "id",
                 storage: dict | None = None) -> Iterator[PreparedChunk]:
    """The shard's images as prepared chunks of one encoder batch each; the workers start at once."""
    from mlprep.views import choose_device_decode

    dataset = ProbeImages(root, groups, labels, size, batch_size, choose_device_decode(jpeg_decoder, device),
                          image_column, label_column, images_dir, id_column, storage)
    return iter_chunks(dataset, workers, pin=device.type == "cuda")
