"""Speaker shard: utterances of one shard list -> utterance embeddings -> speaker embeddings.

All of a speaker's utterances are in one shard (mlprep.speaker.corpus), so the speaker step runs inside
the shard job and the gather only concatenates. Audio is read, downmixed, resampled and cut into model
windows in worker processes (`decode_workers`); the model encodes the windows of many utterances per
forward pass. Precomputed embeddings (`input: embeddings`) are read with numpy.load(allow_pickle=False);
.pkl files only with `trust_pickles: true` (unpickling runs code from the file).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mlprep.devices import job_device, resolve_batch_size, start_context, to_host
from mlprep.failures import FailureLog, ItemError, describe_error, write_failures
from mlprep.io import atomic_dir, save_npy, write_parquet, write_table
from mlprep.sharding import ShardId
from mlprep.shardlists import ShardLists
from mlprep.speaker.audio import load_audio
from mlprep.speaker.backends import load_backend
from mlprep.sources import AUDIO_COLUMNS, LOCATION_COLUMNS, ItemReader, display_paths
from mlprep.speaker.corpus import LIST_COLUMNS, rows_from_list, speaker_keys
from mlprep.speaker.speakers import aggregate, speakers_arrow
from mlprep.stats import ShardStats, scheduler_ids
from mlprep.workers import in_order, resolve_workers

# batch_size `auto`: model windows (resemblyzer) or utterances (speechbrain) per forward pass, per device type
SPEAKER_BATCH = {"cpu": 64, "cuda": 512}
# The loop queues a group of utterances on the device and goes on reading the next: at most this many groups
# are queued on a GPU at once, and embeddings come back to the host every GROUPS_PER_COPY groups (and at the end).
GROUPS_IN_FLIGHT = 2
GROUPS_PER_COPY = 16

log = logging.getLogger(__name__)

SHARD_FILES = {
    "utterance_embeddings": "utterance_embeddings.npy",
    "utterances": "utterances.parquet",
    "speaker_embeddings": "speaker_embeddings.npy",
    "speakers": "speakers.parquet",
    "skipped": "skipped.parquet",
    "failures": "failures.parquet",
    "stats": "stats.json",
}


@dataclass
class Prepared:
    position: int
    windows: np.ndarray | None  # the backend's model input for one utterance
    seconds: float = 0.0
    error: tuple[str, str] | None = None
    timings: dict | None = None  # the reader's seconds by part: read, decode, resample, prepare


@dataclass
class ReaderTotals:
    """What the readers spent, summed over a shard's utterances (on a GPU their CPU can set the job's pace:
    docs/gpu.md): seconds by part, and how many utterances were resampled."""

    seconds: Counter = field(default_factory=Counter)
    utterances: int = 0
    resampled: int = 0

    def add(self, timings: dict | None) -> None:
        self.utterances += 1
        self.seconds.update(timings or {})
        self.resampled += "resample" in (timings or {})


class _Utterances(torch.utils.data.Dataset):
    """Utterances by position: a file is read by its path, a container's member through `reader`."""

    def __init__(self, locations: list[tuple], backend, min_seconds: float, reader: ItemReader | None = None):
        self.locations, self.backend, self.min_seconds = locations, backend, min_seconds
        self.reader = reader or ItemReader(what="audio file")

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, position: int) -> Prepared:
        location = self.locations[position]
        timings: dict[str, float] = {}
        try:
            started = time.perf_counter()
            source = self.reader.read(*location) if location[1] else location[0]
            timings["read"] = time.perf_counter() - started
            wav = load_audio(source, self.backend.sample_rate, self.min_seconds, timings=timings)
            started = time.perf_counter()
            windows = self.backend.prepare(wav)
            timings["prepare"] = time.perf_counter() - started
            return Prepared(position, windows, len(wav) / self.backend.sample_rate, timings=timings)
        except Exception as err:  # noqa: BLE001 - any reader error is this utterance's failure
            return Prepared(position, None, error=describe_error(err, "not_audio"), timings=timings)


def iter_prepared(locations: list, backend, min_seconds: float, workers: int, reader: ItemReader | None = None):
    """Prepared utterances in order; `locations` are mlprep.sources locations ((path, "") for a file)."""
    # About one group of utterances read ahead over all the readers: they keep working while the model encodes
    # the previous group, and the waveforms waiting stay bounded (at batch 512, ~2,000 utterances: ~260 MB of
    # 4 s waveforms), not a group per reader.
    group = backend.pending_factor * backend.batch_size / backend.windows_per_utterance
    return in_order(_Utterances(locations, backend, min_seconds, reader), workers,
                    ahead=max(2, math.ceil(group / max(1, workers))))


def embed_audio(frame: pd.DataFrame, backend, failures: FailureLog, workers: int, min_seconds: float,
                progress: TextIO | None = None, on_encoded=None, reader: ItemReader | None = None,
                readers: ReaderTotals | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings [n_ok, dim], positions of the ok rows in `frame` (path, or LOCATION_COLUMNS), seconds of audio
    per ok row); `readers` gets what the readers spent on every utterance, failed ones included."""
    item_ids = frame["item_id"].tolist()
    if "member" in frame:
        locations = list(frame[LOCATION_COLUMNS].itertuples(index=False, name=None))
        paths = display_paths(frame).tolist()
    else:
        paths = frame["path"].tolist()
        locations = [(path, "") for path in paths]
    pending: list[Prepared] = []
    out_vectors: list[np.ndarray] = []
    on_device: list[torch.Tensor] = []
    in_flight: deque = deque()
    positions: list[int] = []
    seconds: list[float] = []

    def flush(last: bool = False) -> None:
        if pending:
            on_device.append(backend.encode_device([p.windows for p in pending]))
            positions.extend(p.position for p in pending)
            seconds.extend(p.seconds for p in pending)
            pending.clear()
            if backend.device.type == "cuda":  # the host reads the next group while the device encodes this one
                in_flight.append(torch.cuda.Event())
                in_flight[-1].record()
                if len(in_flight) > GROUPS_IN_FLIGHT:  # bounded: each group holds its waveforms in pinned memory
                    in_flight.popleft().synchronize()
            if on_encoded is not None:
                on_encoded()
        if on_device and (last or len(on_device) >= GROUPS_PER_COPY):
            out_vectors.append(to_host(on_device))
            on_device.clear()

    bar = tqdm(total=len(paths), desc="embed utterances", unit="utt", file=progress, mininterval=2.0)
    n_windows = 0
    for prepared in iter_prepared(locations, backend, min_seconds, workers, reader):
        bar.update(1)
        if readers is not None:
            readers.add(prepared.timings)
        if prepared.error is not None:
            failures.record(item_ids[prepared.position], paths[prepared.position], "embed", *prepared.error)
            continue
        pending.append(prepared)
        n_windows += len(prepared.windows)
        if n_windows >= backend.pending_factor * backend.batch_size:  # bounded memory
            flush()
            n_windows = 0
    flush(last=True)
    bar.close()
    vectors = np.concatenate(out_vectors) if out_vectors else np.zeros((0, backend.dim), dtype=np.float32)
    order = np.argsort(positions, kind="stable")
    return vectors[order], np.asarray(positions, dtype=np.int64)[order], np.asarray(seconds)[order]


def _read_embedding(path: str, trust_pickles: bool) -> np.ndarray:
    try:
        if path.endswith(".pkl"):
            if not trust_pickles:
                raise ItemError("bad_embedding", "pickled embeddings need trust_pickles: true (unsafe)")
            with open(path, "rb") as handle:
                array = np.asarray(pickle.load(handle))  # noqa: S301 - the user opted in, documented as unsafe
        else:
            array = np.load(path, allow_pickle=False)
    except ItemError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ItemError("bad_embedding", f"not a readable .npy array: {err}") from err
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number) or len(array) == 0:
        raise ItemError("bad_embedding", f"expected a 1-D numeric vector, got {array.dtype} {array.shape}")
    if not np.isfinite(array).all():
        raise ItemError("bad_embedding", "the vector holds NaN or infinity")
    return array.astype(np.float32)


def read_embeddings(frame: pd.DataFrame, failures: FailureLog, dim: int | None, trust_pickles: bool,
                    progress: TextIO | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n_ok, dim], positions of the ok rows). Without a configured `embedding_dim`, the most
    common length in the shard is expected; other lengths are failures (wrong_dimension)."""
    arrays: dict[int, np.ndarray] = {}
    for position, (item_id, path) in enumerate(tqdm(list(zip(frame["item_id"], frame["path"])), file=progress,
                                                    desc="read embeddings", unit="utt", mininterval=2.0)):
        try:
            arrays[position] = _read_embedding(path, trust_pickles)
        except ItemError as err:
            failures.record(item_id, path, "embed", err.code, str(err))
    lengths = pd.Series({p: len(a) for p, a in arrays.items()}, dtype="int64")
    expected = dim or (int(lengths.value_counts().index[0]) if len(lengths) else 0)
    positions = [p for p in sorted(arrays) if len(arrays[p]) == expected]
    for p in sorted(set(arrays) - set(positions)):
        failures.record(frame["item_id"].iat[p], frame["path"].iat[p], "embed", "wrong_dimension",
                        f"{len(arrays[p])} values, expected {expected}")
    vectors = np.stack([arrays[p] for p in positions]) if positions else np.zeros((0, expected), np.float32)
    return vectors, np.asarray(positions, dtype=np.int64)


def embed_shard(shard_text: str, list_path: Path | str, cfg: dict, device_spec: str, continue_on_error: bool,
                threads: int, out_dir: Path | str, progress: TextIO | None = None, storage: dict | None = None) -> dict:
    """Embed one shard's utterances and make its speakers' embeddings (the folder is written whole or not at all)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(max(1, threads)):  # numpy's BLAS too keeps to the job's cores
        return _embed_shard(shard_text, list_path, cfg, device_spec, continue_on_error, threads, out_dir, progress,
                            storage)


def _embed_shard(shard_text: str, list_path: Path | str, cfg: dict, device_spec: str, continue_on_error: bool,
                 threads: int, out_dir: Path | str, progress: TextIO | None, storage: dict | None) -> dict:
    shard = ShardId.parse(shard_text)
    stats = ShardStats(str(shard))
    stats.mark("imports")
    frame = rows_from_list(ShardLists.read(list_path, LIST_COLUMNS))
    frame["speaker_key"] = speaker_keys(frame["dataset"], frame["speaker_id"])
    failures = FailureLog(continue_on_error)
    extra: dict = {}
    workers = cfg["decode_workers"]
    if cfg["input"] == "audio":
        device = job_device(device_spec, threads)
        workers = resolve_workers(workers, device, threads)
        batch = resolve_batch_size(cfg["batch_size"], device, SPEAKER_BATCH)
        context = start_context(device)
        backend = load_backend(cfg["backend"], device, batch, cfg.get("weights"), cfg.get("source"),
                               cfg.get("length_quantum_s", 0.1))
        if context is not None:
            context.join()
        stats.mark("model_built")
        reader = ItemReader(cfg.get("parquet_column", "auto"), "audio file", storage, AUDIO_COLUMNS)
        readers = ReaderTotals()
        vectors, positions, seconds = embed_audio(frame, backend, failures, workers, cfg["min_seconds"], progress,
                                                  stats.first_item_done, reader, readers)
        extra = {"backend": backend.name, "device": str(device), "batch_size": batch,
                 "audio_seconds": round(float(seconds.sum()), 3),
                 # where the readers' CPU went, summed over the utterances and spread over the decode workers
                 "reader_seconds": {part: round(s, 3) for part, s in readers.seconds.items()},
                 "resampled_utterances": readers.resampled,
                 "model_config": {k: cfg.get(k) for k in ("backend", "weights", "source", "length_quantum_s",
                                                          "min_seconds")}}
    else:
        torch.set_num_threads(max(1, threads))
        vectors, positions = read_embeddings(frame, failures, cfg.get("embedding_dim"), cfg["trust_pickles"], progress)
        seconds = np.full(len(positions), np.nan)
        stats.first_item_done()
    ok = frame.iloc[positions].reset_index(drop=True).assign(duration_s=seconds)
    ok["path"] = display_paths(ok)
    failed_ids = {f.item_id for f in failures.records}
    failed = frame[frame["item_id"].isin(failed_ids)]
    speakers = aggregate(ok, vectors, failed, min_utterances=cfg["min_utterances"], normalize=cfg["normalize"],
                         outlier_std=cfg.get("outlier_std"))
    stats.ok, stats.failed = len(ok), len(failures)
    stats.counts = {"utterances": len(ok), "speakers": len(speakers.table)}
    stats.extra = {**extra, "threads": threads, "decode_workers": workers,
                   "speakers_skipped": len(speakers.skipped), **scheduler_ids(),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    utterance_columns = ["item_id", "dataset", "speaker_id", "utterance_id", "speaker_key", "path", "duration_s"]
    with atomic_dir(out_dir) as folder:
        save_npy(np.ascontiguousarray(vectors, dtype=np.float32), folder / SHARD_FILES["utterance_embeddings"])
        write_parquet(ok[utterance_columns], folder / SHARD_FILES["utterances"], "speaker.utterances")
        save_npy(speakers.embeddings, folder / SHARD_FILES["speaker_embeddings"])
        write_table(speakers_arrow(speakers.table), folder / SHARD_FILES["speakers"], "speaker.shard_speakers")
        write_parquet(speakers.skipped, folder / SHARD_FILES["skipped"], "speaker.skipped")
        write_failures(failures.records, folder / SHARD_FILES["failures"])
        data = stats.write(folder / SHARD_FILES["stats"])
    log.info("shard %s: %s", shard, data)
    return data
