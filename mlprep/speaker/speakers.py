"""Speaker embeddings from utterance embeddings: one vectorised group-by, no Python loop per speaker.

Per (dataset, speaker_id): average the utterance embeddings (`normalize`: L2-normalise them before,
the mean after, both, or neither), optionally drop utterances far from the first centroid (cosine below
the speaker's mean minus `outlier_std` standard deviations) and average again, and record the seed's
fields (num_utterances, failed_utterances, utterance_list, original_paths, embedding_dim,
embedding_stats) plus the spread: the mean cosine of the kept utterances to the centroid.
Speakers with fewer than `min_utterances` kept utterances go to the skipped table with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

NORMALIZE = ("before", "after", "both", "none")
SPEAKER_COLUMNS = ["speaker_key", "dataset", "speaker_id", "num_utterances", "failed_utterances",
                   "dropped_outliers", "utterance_list", "original_paths", "embedding_dim", "spread",
                   "embedding_mean", "embedding_std", "embedding_min", "embedding_max"]
SKIPPED_COLUMNS = ["speaker_key", "dataset", "speaker_id", "num_utterances", "failed_utterances", "reason"]


@dataclass
class Speakers:
    table: pd.DataFrame  # SPEAKER_COLUMNS, sorted by speaker_key
    embeddings: np.ndarray  # float32 [n_speakers, dim], rows in table order
    skipped: pd.DataFrame  # SKIPPED_COLUMNS


ROW_CHUNK = 1 << 16  # rows per step where a per-row product is needed: bounded temporaries


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """L2 norm of each row without a temporary the size of `vectors` (zero rows get 1)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors).astype(np.float64))  # float32 sums: 5x faster
    return np.where(norms > 0, norms, 1.0)


def group_sum(vectors: np.ndarray, group: np.ndarray, n_groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted row sum per group [n_groups, dim], as one sparse [groups x rows] product: rows
    stay where they are, nothing the size of `vectors` is copied (np.add.reduceat over the rows of a 2-D
    array runs ~15x slower at a million rows and needs them sorted)."""
    from scipy import sparse

    # The matrix takes the vectors' dtype: a float64 matrix would make scipy convert every row to float64.
    data = np.ones(len(group), vectors.dtype) if weights is None else np.asarray(weights, dtype=vectors.dtype)
    members = sparse.csr_matrix((data, (group, np.arange(len(group)))), shape=(n_groups, len(group)))
    return np.asarray(members @ vectors, dtype=np.float64)


def group_mean(vectors: np.ndarray, group: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean row per group."""
    return (group_sum(vectors, group, len(counts)) / np.maximum(counts, 1)[:, None]).astype(vectors.dtype)


def row_cosines(vectors: np.ndarray, norms: np.ndarray, directions: np.ndarray, group: np.ndarray) -> np.ndarray:
    """cos(vectors[i], directions[group[i]]) for unit `directions`, in chunks of rows."""
    out = np.empty(len(vectors), dtype=np.float64)
    for start in range(0, len(vectors), ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        out[rows] = np.einsum("ij,ij->i", vectors[rows], directions[group[rows]].astype(vectors.dtype))
    return out / norms


def _list_column(values: pd.Series, rows: np.ndarray, offsets: np.ndarray, chosen: np.ndarray) -> pd.Series:
    """values[rows] cut at `offsets` into one list per group, for the `chosen` groups: built in Arrow, no
    Python object per speaker or utterance (write it with speakers_arrow)."""
    import pyarrow as pa

    flat = pa.array(values, type=pa.string())
    if isinstance(flat, pa.ChunkedArray):  # columns read from parquet
        flat = flat.combine_chunks()
    flat = flat.take(pa.array(rows, type=pa.int64()))
    lists = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat).take(pa.array(chosen, pa.int64()))
    return pd.Series(pd.arrays.ArrowExtensionArray(lists))


def speaker_schema():
    """The speaker table's one schema (mlprep.tables' `speaker.shard_speakers`), whatever a shard holds: an empty
    shard's columns would otherwise come out as nulls and float64."""
    from mlprep.tables import schema_of

    return schema_of("speaker.shard_speakers")


def speakers_arrow(table: pd.DataFrame):
    """The speaker table as an Arrow table of speaker_schema()."""
    from mlprep.tables import to_arrow

    if table.empty:  # no speaker left (its columns may not even be there): the schema with no rows
        return speaker_schema().empty_table()
    return to_arrow(table[SPEAKER_COLUMNS], "speaker.shard_speakers")


def aggregate(utterances: pd.DataFrame, vectors: np.ndarray, failed: pd.DataFrame | None = None, *,
              min_utterances: int = 1, normalize: str = "before", outlier_std: float | None = None) -> Speakers:
    """`utterances`: speaker_key, dataset, speaker_id, item_id, path, one row per row of `vectors`.
    `failed`: speaker_key, dataset, speaker_id of each failed utterance (counted, never averaged).
    Speakers come out sorted by key, each one's utterance_list in input order (a shard job's rows are
    sorted by id). Nothing the size of `vectors` is copied (a million 256-dim rows: ~1 GiB)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    failed = failed if failed is not None else pd.DataFrame(columns=["speaker_key", "dataset", "speaker_id"])
    failed_counts = failed.groupby("speaker_key").size()
    vectors = np.asarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    group, speaker_keys = pd.factorize(utterances["speaker_key"], sort=True)  # each row: its speaker's number
    group = np.asarray(group, dtype=np.int64)
    n_groups = len(speaker_keys)
    counts = np.bincount(group, minlength=n_groups)
    order = np.argsort(group, kind="stable")  # rows grouped by speaker, input order within
    norms = row_norms(vectors) if len(vectors) else np.ones(0)
    per_row = 1.0 / norms if normalize in ("before", "both") else np.ones(len(vectors))  # the averaged rows
    keep = np.ones(len(vectors), dtype=bool)
    if outlier_std is not None and len(vectors):
        # The best utterance of a speaker is always >= its mean cosine: every speaker keeps at least one.
        cos = row_cosines(vectors, norms, _unit(group_sum(vectors, group, n_groups, per_row)), group)
        mean = np.bincount(group, weights=cos, minlength=n_groups) / counts
        var = np.bincount(group, weights=(cos - mean[group]) ** 2, minlength=n_groups) / counts
        keep = cos >= mean[group] - outlier_std * np.sqrt(var)[group] - 1e-12
    kept_counts = np.bincount(group[keep], minlength=n_groups)
    sums = group_sum(vectors, group, n_groups, per_row * keep) if len(vectors) else np.zeros((0, dim))
    centroids = sums / np.maximum(kept_counts, 1)[:, None]
    if normalize in ("after", "both"):
        centroids = _unit(centroids)
    centroids = centroids.astype(np.float32)
    # spread: mean over kept rows of cos(row, centroid) = (sum of the kept unit rows) . unit(centroid) / count
    unit_sums = sums if normalize in ("before", "both") else (
        group_sum(vectors, group, n_groups, keep / norms) if len(vectors) else sums)
    spread = np.einsum("ij,ij->i", unit_sums, _unit(centroids.astype(np.float64))) / np.maximum(kept_counts, 1)

    first = utterances.iloc[order[np.r_[0, np.cumsum(counts)[:-1]]]] if n_groups else utterances.iloc[:0]
    keys = np.asarray(speaker_keys, dtype=object)
    per_speaker = pd.DataFrame({
        "speaker_key": keys, "dataset": first["dataset"].to_numpy(), "speaker_id": first["speaker_id"].to_numpy(),
        "num_utterances": kept_counts,
        "failed_utterances": failed_counts.reindex(keys).fillna(0).astype(int).to_numpy(),
        "dropped_outliers": counts - kept_counts,
    })
    enough = kept_counts >= max(1, int(min_utterances))
    chosen = np.flatnonzero(enough)
    emb = centroids[chosen]
    table = per_speaker.iloc[chosen].reset_index(drop=True)
    kept_rows, offsets = order[keep[order]], np.r_[0, np.cumsum(kept_counts)]
    table["utterance_list"] = _list_column(utterances["item_id"], kept_rows, offsets, chosen)
    table["original_paths"] = _list_column(utterances["path"], kept_rows, offsets, chosen)
    table["embedding_dim"] = dim
    table["spread"] = spread[chosen]
    for name, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        table[f"embedding_{name}"] = fn(emb, axis=1) if len(emb) else np.zeros(0)

    skipped = per_speaker[~enough][["speaker_key", "dataset", "speaker_id", "num_utterances", "failed_utterances"]]
    skipped = skipped.assign(reason=[f"{n} usable utterance(s), fewer than min_utterances {min_utterances}"
                                     for n in skipped["num_utterances"]])
    only_failed = sorted(set(failed_counts.index) - set(per_speaker["speaker_key"]))
    if only_failed:
        info = failed.drop_duplicates("speaker_key").set_index("speaker_key").loc[only_failed]
        skipped = pd.concat([skipped, pd.DataFrame({
            "speaker_key": only_failed, "dataset": info["dataset"].to_numpy(), "speaker_id": info["speaker_id"].to_numpy(),
            "num_utterances": 0, "failed_utterances": failed_counts.loc[only_failed].to_numpy(),
            "reason": "every utterance failed"})])
    skipped = skipped.sort_values("speaker_key").reset_index(drop=True)[SKIPPED_COLUMNS]
    return Speakers(table[SPEAKER_COLUMNS], emb, skipped)
