"""Geometric verification of retrieval candidates: local features of catalog photos and queries, matched and
fitted with a homography; the inliers say whether the query shows the same physical product (the same region of
the same artwork), which global embeddings of look-alike products cannot.

A photo's features: OpenCV SIFT keypoints on the greyscale image scaled so its long side is at most `max_side`,
the `max_features` strongest kept; points float16 (pixels of that scaled image), descriptors uint8 (SIFT's are
integers 0-255: nothing is lost). At 256 features a photo takes 33 KB. The catalog's are computed once, in the
shard jobs' readers (the bytes are already read there), never per query.

A query against a candidate SKU: for each of its catalog photos, Lowe's ratio test on the two nearest descriptors,
then a RANSAC homography (`ransac_px`); the SKU's inliers are its best photo's. Scores fuse as
`embedding score + weight * min(inliers, cap) / cap` for SKUs with at least `min_inliers` (the rest keep their
embedding score), so geometry reorders candidates only where it found the product.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DESCRIPTOR_BYTES = 128


@dataclass(frozen=True)
class Geometry:
    enabled: bool = True
    top_k: int = 10
    max_features: int = 256
    max_side: int = 480
    ratio: float = 0.8
    ransac_px: float = 6.0
    min_inliers: int = 10
    cap: int = 40
    weight: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict | None) -> Geometry:
        from mlprep.config import settings_from_config

        return settings_from_config(cls, cfg, "sku_index.rerank")


@dataclass
class Features:
    points: np.ndarray  # float16 [n, 2]
    descriptors: np.ndarray  # uint8 [n, 128]

    def __len__(self) -> int:
        return len(self.points)

    @classmethod
    def empty(cls) -> Features:
        return cls(np.zeros((0, 2), np.float16), np.zeros((0, DESCRIPTOR_BYTES), np.uint8))

    @classmethod
    def joined(cls, parts: list[Features]) -> Features:
        """Every part's features, one after the other (memory-mapped parts are read here)."""
        if not parts:
            return cls.empty()
        return cls(np.concatenate([np.asarray(p.points) for p in parts]).astype(np.float16, copy=False),
                   np.concatenate([np.asarray(p.descriptors) for p in parts]).astype(np.uint8, copy=False))

    @property
    def nbytes(self) -> int:
        return self.points.nbytes + self.descriptors.nbytes


_SIFT = threading.local()  # a detector per thread: a job's readers may prepare several photos at once


def _sift(max_features: int):
    import cv2

    cv2.setNumThreads(1)
    made = _SIFT.__dict__.setdefault("made", {})
    if max_features not in made:
        made[max_features] = cv2.SIFT_create(nfeatures=max_features)
    return made[max_features]


def grey_for_features(data: bytes, max_side: int) -> np.ndarray:
    """Image bytes -> uint8 greyscale [h, w], EXIF orientation applied, long side at most `max_side`."""
    from mlprep.views import decode_within

    return np.asarray(decode_within(data, "L", max_side))


def photo_features(grey: np.ndarray, max_features: int) -> Features:
    keypoints, descriptors = _sift(max_features).detectAndCompute(grey, None)
    if descriptors is None or not len(keypoints):
        return Features.empty()
    keypoints, descriptors = keypoints[:max_features], descriptors[:max_features]
    points = np.array([kp.pt for kp in keypoints], dtype=np.float16)
    return Features(points, np.clip(np.rint(descriptors), 0, 255).astype(np.uint8))


def features_of(data: bytes, settings: Geometry) -> Features:
    return photo_features(grey_for_features(data, settings.max_side), settings.max_features)


def inliers(query: Features, photo: Features, settings: Geometry) -> int:
    """Inliers of the homography fitted to the ratio-tested matches of `query` in `photo` (0 when too few)."""
    import cv2

    if len(query) < 4 or len(photo) < 4:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    pairs = matcher.knnMatch(query.descriptors.astype(np.float32), photo.descriptors.astype(np.float32), k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < settings.ratio * n.distance]
    if len(good) < max(4, settings.min_inliers // 2):
        return 0
    src = query.points[[m.queryIdx for m in good]].astype(np.float32)
    dst = photo.points[[m.trainIdx for m in good]].astype(np.float32)
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, settings.ransac_px, maxIters=500, confidence=0.995)
    return int(mask.sum()) if mask is not None else 0


def fused(score: float, count: int, settings: Geometry) -> float:
    if count < settings.min_inliers:
        return float(score)
    return float(score + settings.weight * min(count, settings.cap) / settings.cap)


def rerank(candidates: list[tuple[str, float]], query: Features, photos_of, settings: Geometry
           ) -> list[tuple[str, float, float, int]]:
    """(sku, fused score, embedding score, inliers) for the top_k candidates, best first; `photos_of(sku)` gives
    the candidate's catalog photos' Features."""
    out = []
    for sku, score in candidates[: settings.top_k]:
        count = max((inliers(query, photo, settings) for photo in photos_of(sku)), default=0)
        out.append((sku, fused(score, count, settings), float(score), count))
    out.sort(key=lambda row: -row[1])
    return out + [(sku, float(score), float(score), 0) for sku, score in candidates[settings.top_k :]]


class FeatureTable:
    """Local features of many photos (or queries): a table with a row per photo (`first`, `count` into the arrays)
    and two arrays, points float16 [F, 2] and descriptors uint8 [F, 128], stored as `<name>.parquet`,
    `<name>_points.npy` and `<name>_descriptors.npy` (memory-mapped when read: a service holds a million photos'
    features without reading them all)."""

    def __init__(self, rows: pd.DataFrame, points: np.ndarray, descriptors: np.ndarray, table: str):
        self.rows, self.points, self.descriptors, self.table = rows, points, descriptors, table
        self._first = rows["first"].to_numpy(dtype=np.int64) if len(rows) else np.zeros(0, np.int64)
        self._count = rows["count"].to_numpy(dtype=np.int64) if len(rows) else np.zeros(0, np.int64)

    @classmethod
    def build(cls, entries: list[tuple[dict, Features]], table: str) -> FeatureTable:
        """From (row values without first/count, Features) pairs."""
        rows, first = [], 0
        for values, features in entries:
            rows.append({**values, "first": first, "count": len(features)})
            first += len(features)
        joined = Features.joined([f for _, f in entries])
        return cls(pd.DataFrame(rows), joined.points, joined.descriptors, table)

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, row: int) -> Features:
        a, n = self._first[row], self._count[row]
        return Features(np.asarray(self.points[a : a + n]), np.asarray(self.descriptors[a : a + n]))

    def select(self, keep: np.ndarray) -> FeatureTable:
        """The rows `keep` names (a mask or positions, in that order), their features copied into new arrays."""
        keep = np.asarray(keep)
        keep = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        spans = [np.arange(a, a + n) for a, n in zip(self._first[keep], self._count[keep])]
        rows = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        frame = self.rows.iloc[keep].reset_index(drop=True)
        counts = self._count[keep]
        frame["first"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else []
        return FeatureTable(frame, np.asarray(self.points[rows]), np.asarray(self.descriptors[rows]), self.table)

    @staticmethod
    def paths(folder: Path | str, name: str) -> tuple[Path, Path, Path]:
        folder = Path(folder)
        return folder / f"{name}.parquet", folder / f"{name}_points.npy", folder / f"{name}_descriptors.npy"

    def write(self, folder: Path | str, name: str) -> None:
        from mlprep.io import save_npy, write_parquet

        table, points, descriptors = self.paths(folder, name)
        from mlprep.tables import TABLES

        write_parquet(self.rows.reindex(columns=TABLES[self.table].names), table, self.table)
        save_npy(np.ascontiguousarray(self.points, dtype=np.float16), points)
        save_npy(np.ascontiguousarray(self.descriptors, dtype=np.uint8), descriptors)

    @classmethod
    def read(cls, folder: Path | str, name: str, table: str, mmap: bool = True) -> FeatureTable:
        rows_path, points, descriptors = cls.paths(folder, name)
        mode = "r" if mmap else None
        return cls(pd.read_parquet(rows_path), np.load(points, mmap_mode=mode, allow_pickle=False),
                   np.load(descriptors, mmap_mode=mode, allow_pickle=False), table)

    @classmethod
    def concat(cls, tables: list[FeatureTable], table: str) -> FeatureTable:
        frames, offset = [], 0
        for t in tables:
            frame = t.rows.copy()
            if len(frame):
                frame["first"] = frame["first"].astype(np.int64) + offset
            frames.append(frame)
            offset += len(t.points)
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        joined = Features.joined([Features(t.points, t.descriptors) for t in tables])
        return cls(rows, joined.points, joined.descriptors, table)
