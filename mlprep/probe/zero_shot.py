"""The offline probe: CLIP zero-shot classification of each image against the dataset's label set.

Each label becomes a prompt from `prompt_template` ("a photo of a {label}."); the prompts are encoded once,
each image's embedding is compared with all of them, and the best label is the prediction, with its
softmax probability (CLIP's logit scale) as the score. Images are decoded row group by row group
(mlprep.probe.reader), resized (shorter side to the model's size, centre crop) and encoded in batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import FailureLog, ItemError
from mlprep.probe.reader import decode_image, iter_row_groups, row_id

PROBE_COLUMNS = ["item_id", "file", "row_group", "group_row", "row", "label", "prediction", "score", "correct"]


def square_pixels(image, size: int) -> np.ndarray:
    """uint8 [3, size, size]: shorter side scaled to `size` (bicubic), centre crop."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)


@dataclass
class ZeroShot:
    encoder: object  # mlprep.encoders.ClipEncoder
    labels: list[str]
    template: str = "a photo of a {label}."

    def __post_init__(self) -> None:
        self.text = self.encoder.encode_texts([self.template.format(label=label) for label in self.labels])
        logit_scale = getattr(self.encoder.model, "logit_scale", None)  # CLIP's learned temperature
        self.scale = float(logit_scale.detach().exp()) if logit_scale is not None else 100.0

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, 3, S, S] -> (label index, probability of it) per image."""
        import torch

        if not len(pixels):
            return np.zeros(0, np.int64), np.zeros(0)
        logits = self.scale * (self.encoder.encode_images(torch.from_numpy(pixels)) @ self.text.T)
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        best = prob.argmax(axis=1)
        return best, prob[np.arange(len(best)), best]


def probe_frame(file: str, group: int, first_row: int, group_rows: list[int], labels: list[str],
                predictions: list[str], scores: list[float]) -> pd.DataFrame:
    """PROBE_COLUMNS for the probed rows of one row group."""
    rows = [first_row + r for r in group_rows]
    return pd.DataFrame({"item_id": [row_id(file, r) for r in rows], "file": file, "row_group": group,
                         "group_row": group_rows, "row": rows, "label": labels, "prediction": predictions,
                         "score": scores, "correct": [a == b for a, b in zip(labels, predictions)]},
                        columns=PROBE_COLUMNS)


def probe_rows(root: Path | str, groups: pd.DataFrame, probe: ZeroShot, failures: FailureLog,
               image_column: str = "image", label_column: str = "label", images_dir=None,
               batch: int = 64) -> Iterator[pd.DataFrame]:
    """PROBE_COLUMNS per readable row group of `groups` (streamed: one row group in memory at a time);
    bad row groups and images are recorded in `failures`, a label outside the label set as `bad_record`."""
    size = probe.encoder.image_size
    index = {label: k for k, label in enumerate(probe.labels)}
    first_rows = dict(zip(zip(groups["file"], groups["row_group"]), groups["first_row"]))
    for file, group, frame in iter_row_groups(root, groups, [image_column, label_column], failures):
        first = int(first_rows[(file, group)])
        rows, labels, pixels = [], [], []
        for row, (cell, label) in enumerate(zip(frame[image_column], frame[label_column])):
            try:
                if str(label) not in index:
                    raise ItemError("bad_record", f"label {label!r} is not in the label set")
                pixels.append(square_pixels(decode_image(cell, images_dir), size))
            except ItemError as err:
                failures.record(row_id(file, first + row), str(Path(root) / file), "probe", err.code, str(err))
                continue
            rows.append(row)
            labels.append(str(label))
        predictions, scores = [], []
        for start in range(0, len(pixels), batch):
            best, score = probe.predict(np.stack(pixels[start : start + batch]))
            predictions.extend(probe.labels[k] for k in best)
            scores.extend(score.tolist())
        yield probe_frame(file, group, first, rows, labels, predictions, scores)
