"""Extract shard: reader (clips of one split shard) -> decode in watchdog processes, one per job thread -> pkl writer.

The pkl shard is a list of records, the CLIP4MC format a training loader streams:
{"id", "text", "frames" (uint8 [num_frames, H, W, 3] RGB), "fps", "frame_indices", "duration",
 "start", "end", "source_frames", "container_frames", "repeated", "note"}.
With `webdataset` set, the same records also go to a webdataset tar beside it (write_webdataset).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from mlprep.failures import Failure, FailureLog, describe_error, failures_frame
from mlprep.io import atomic_path, write_parquet
from mlprep.sharding import ShardId
from mlprep.sources import VIDEO_COLUMNS, ItemReader
from mlprep.shardlists import ShardLists
from mlprep.stats import ShardStats, scheduler_ids
from mlprep.video.decode import extract_clip
from mlprep.video.pairs import LIST_COLUMNS, ClipItem, items_from_list
from mlprep.watchdog import Watchdog

log = logging.getLogger(__name__)

# One row per clip of the shard; a failed clip's row carries the failure (reason_code, and the reason in
# `note`), and the shard's stats ride in the file's metadata: one small file beside each pkl.
INDEX_COLUMNS = ["clip_id", "text", "n_frames", "status", "repeated", "note", "reason_code", "path"]


@dataclass(frozen=True)
class ExtractSettings:
    num_frames: int = 16
    width: int = 256
    height: int = 160
    backend: str = "decord"
    hwaccel: str | None = None
    timeout_s: float = 120.0
    threads: int = 1
    lanes: int | None = None  # clips decoded at once (DecodeLanes); None: one per thread, each with one codec thread

    @classmethod
    def from_config(cls, cfg: dict, threads: int = 1) -> ExtractSettings:
        return cls(cfg["num_frames"], cfg["width"], cfg["height"], cfg["backend"], cfg.get("hwaccel"),
                   float(cfg["timeout_s"]), threads)


class DecoderChoice:
    """`hwaccel: auto`: the shard's first clips are decoded on the CPU and on NVDEC, each timed, and the rest of
    the shard goes to whichever was faster on the last of them (the first pays each decoder's warm-up). The
    clips decoded twice keep the CPU's frames. NVDEC is ruled out at once where it cannot run (no GPU, decord,
    which has none), refuses a clip, or gives frames more than MAX_LEVELS from the CPU's; stats say what was
    chosen and on what figures."""

    TRIALS = 2
    MAX_LEVELS = 2

    def __init__(self, backend: str):
        self.trials: list[dict] = []
        self.chosen: str | None = "cpu" if backend == "decord" else None
        self.reason = "decord has no GPU decoder" if self.chosen else ""

    @property
    def hwaccel(self) -> str | None:
        """What the clips after the trials are decoded with: `cuda` once NVDEC was chosen, else None (the CPU)."""
        return "cuda" if self.chosen == "nvdec" else None

    def decode(self, run):
        if self.chosen is not None:
            return run(self.hwaccel)
        started = time.perf_counter()
        clip = run(None)  # a clip the CPU cannot decode fails here, as without auto, and decides nothing
        cpu_s = time.perf_counter() - started
        started = time.perf_counter()
        try:
            gpu = run("cuda")
        except Exception as err:  # noqa: BLE001 - NVDEC's trouble with this clip: the CPU decodes the shard
            self.chosen, self.reason = "cpu", f"NVDEC failed on a trial clip: {err}"[:300]
            return clip
        nvdec_s = time.perf_counter() - started
        diff = int(np.abs(gpu.frames.astype(np.int16) - clip.frames).max()) if gpu.frames.shape == clip.frames.shape \
            else 255
        if gpu.note:  # read_nvdec fell back to the CPU: no GPU here, or NVDEC refused the stream
            self.chosen, self.reason = "cpu", gpu.note
        elif diff > self.MAX_LEVELS:
            self.chosen, self.reason = "cpu", f"NVDEC's frames differ from the CPU's by {diff} levels"
        else:
            self.trials.append({"cpu_s": round(cpu_s, 4), "nvdec_s": round(nvdec_s, 4), "max_abs_diff": diff})
            if len(self.trials) >= self.TRIALS:
                last = self.trials[-1]
                self.chosen = "nvdec" if last["nvdec_s"] < last["cpu_s"] else "cpu"
                self.reason = f"{'NVDEC' if self.chosen == 'nvdec' else 'the CPU'} was faster on the last trial clip"
        return clip

    def summary(self) -> dict:
        return {"hwaccel": "auto", "decoder": self.chosen or "cpu",
                "reason": self.reason or "too few clips decoded to compare: the CPU decoded them",
                "trials": self.trials}


class DecodeLanes:
    """`lanes` watchdog processes driven by as many threads of the job's process: a job given T threads decodes T
    clips at once, each with one codec thread, instead of one clip at a time with T codec threads (on 2 cores,
    1.25-1.71x the clips/s with decord, 1.70x with PyAV: bench/video_frames.py; a codec's threads share out one
    frame's work, clips share nothing). Each watchdog runs one call at a time and is taken from a free queue for
    it; the children are forked before any thread starts (a timed-out or crashed one is forked again by its lane).
    The lane freed last is taken first, so that calls one after another (`hwaccel: auto`'s trial clips) run in one
    process and find the decoders it keeps (mlprep.video.decode.KeptDecoders) warm."""

    def __init__(self, lanes: int, timeout: float):
        self.watchdogs = [Watchdog(timeout).start() for _ in range(max(1, lanes))]
        self._free: queue.LifoQueue[Watchdog] = queue.LifoQueue()
        for watchdog in self.watchdogs:
            self._free.put(watchdog)
        self._pool = ThreadPoolExecutor(len(self.watchdogs), "mlprep-decode") if len(self.watchdogs) > 1 else None

    def call(self, fn: Callable, *args):
        """Run fn(*args) in a free lane's process and wait for it."""
        watchdog = self._free.get()
        try:
            return watchdog.call(fn, *args)
        finally:
            self._free.put(watchdog)

    def submit(self, fn: Callable, *args) -> Future:
        """fn(*args) in the next free lane; with one lane it runs now, in this thread."""
        if self._pool is not None:
            return self._pool.submit(self.call, fn, *args)
        future: Future = Future()
        try:
            future.set_result(self.call(fn, *args))
        except Exception as err:  # noqa: BLE001 - the clip's failure, read from the future like a lane's
            future.set_exception(err)
        return future

    def close(self, abort: bool = False) -> None:
        """Stop the lanes; `abort` (the shard stopped on an error) kills the decodes in flight instead of waiting."""
        if abort:
            for watchdog in self.watchdogs:
                watchdog.interrupt()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for watchdog in self.watchdogs:
            watchdog.close()


def extract_items(
    items: list[ClipItem],
    settings: ExtractSettings,
    failures: FailureLog,
    progress: TextIO | None = None,
    decode=extract_clip,
    on_item: Callable[[], None] | None = None,
    reader: ItemReader | None = None,
    choice: dict | None = None,
) -> tuple[list[dict], pd.DataFrame]:
    """Records for the clips that decode, in the items' order; a failure row for each that does not (or hangs).

    A job of `settings.threads` threads decodes that many clips at once (DecodeLanes), at most 2 per lane ahead of
    the one it writes next. A clip in a container is read through `reader` (mlprep.sources), in this thread, into
    a scratch file of its own, which every decoder backend opens as it opens a clip file, and which goes once its
    clip is written. `on_item` is called after each clip (the job's stats time the first one). With `hwaccel:
    auto`, `choice` receives the decoder the shard chose and why (DecoderChoice): its trial clips are decoded one
    after another, each alone, before any other clip starts."""
    records, rows = [], []
    reader = reader or ItemReader(what="clip file")
    chooser = DecoderChoice(settings.backend) if settings.hwaccel == "auto" else None
    lanes = max(1, min(settings.lanes or settings.threads, len(items)))
    codec_threads = max(1, settings.threads // lanes)
    pending: deque[tuple[ClipItem, str | None, Future]] = deque()

    def finish() -> None:
        item, scratch_file, future = pending.popleft()
        try:
            clip = future.result()
        except Exception as err:  # noqa: BLE001 - decode errors, timeouts and crashes are this clip's failure
            code, reason = describe_error(err)
            failures.record(item.clip_id, item.where, "decode", code, reason)
            rows.append({"clip_id": item.clip_id, "text": item.text, "n_frames": 0, "status": "failed",
                         "repeated": False, "note": reason, "reason_code": code, "path": item.where})
            clip = None
        finally:
            if scratch_file is not None:
                Path(scratch_file).unlink(missing_ok=True)
        bar.update()
        if on_item is not None:
            on_item()
        if clip is None:
            return
        records.append({
            "id": item.clip_id,
            "text": item.text,
            "frames": clip.frames,
            "fps": clip.fps,
            "frame_indices": clip.indices,
            "duration": clip.duration,
            "start": item.start,
            "end": item.end,
            "source_frames": clip.source_frames,
            "container_frames": clip.container_frames,
            "repeated": clip.repeated,
            "note": clip.note,
        })
        rows.append({"clip_id": item.clip_id, "text": item.text, "n_frames": len(clip.frames), "status": "ok",
                     "repeated": clip.repeated, "note": clip.note, "reason_code": "", "path": item.where})

    decoders = DecodeLanes(lanes, settings.timeout_s)
    stopped = True
    try:
        with tempfile.TemporaryDirectory(prefix="mlprep-clip-") as scratch, \
                tqdm(total=len(items), desc="extract clips", unit="clip", file=progress, mininterval=2.0) as bar:
            for position, item in enumerate(items):
                trial = chooser is not None and chooser.chosen is None
                while pending and (trial or len(pending) >= 2 * lanes):
                    finish()
                future: Future = Future()
                path = scratch_file = None
                try:
                    if item.member:
                        path = scratch_file = f"{scratch}/clip{position}{os.path.splitext(item.member)[1][:8]}"
                        Path(path).write_bytes(reader.read(*item.location))
                    else:
                        path = item.path
                    args = (path, settings.num_frames, settings.width, settings.height, settings.backend,
                            item.start, item.end, codec_threads)
                    if trial:
                        future.set_result(chooser.decode(lambda hwaccel: decoders.call(decode, *args, hwaccel)))
                    else:
                        hwaccel = settings.hwaccel if chooser is None else chooser.hwaccel
                        future = decoders.submit(decode, *args, hwaccel)
                except Exception as err:  # noqa: BLE001 - reading its member or a trial decode: the clip's failure
                    future.set_exception(err)
                pending.append((item, scratch_file, future))
            while pending:
                finish()
        stopped = False
    finally:
        decoders.close(abort=stopped)
    if chooser is not None and choice is not None:
        choice.update(chooser.summary())
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype(
        {"clip_id": "string", "text": "string", "n_frames": "int32", "status": "string", "repeated": "bool",
         "note": "string", "reason_code": "string", "path": "string"}
    )
    return records, index


WEBDATASET_META = ("id", "fps", "frame_indices", "duration", "start", "end", "source_frames", "container_frames",
                    "repeated", "note")


def sample_key(shard: str, position: int) -> str:
    """A clip's key in its shard's tar: `<split>-<shard index>-<position>`, no dots or slashes (webdataset's key
    ends at the first dot of a member's name); the clip's own id is in its `.json`."""
    split, name = shard.split("/")
    return f"{split}-{ShardId.parse(name).index:05d}-{position:06d}"


def _jpeg(frame, quality: int = 95) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_webdataset(records: list[dict], path: Path | str, shard: str, frames_as: str) -> int:
    """The shard's clips as a webdataset tar, one sample per clip: `{key}.npy` (the uint8 [num_frames, H, W, 3]
    array) or `{key}.frame00.jpg` ... (one JPEG per frame, quality 95), `{key}.txt` (the text) and `{key}.json`
    (id and WEBDATASET_META); what webdataset, video2dataset's readers and `tar` read. Members carry no time or
    owner, so the same records give the same bytes."""
    import io
    import json
    import tarfile

    import numpy as np

    def add(archive, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        archive.addfile(info, io.BytesIO(data))

    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return None if isinstance(value, float) and value != value else value

    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
        for position, record in enumerate(records):
            key = sample_key(shard, position)
            if frames_as == "npy":
                buffer = io.BytesIO()
                np.save(buffer, np.ascontiguousarray(record["frames"]), allow_pickle=False)
                add(archive, f"{key}.npy", buffer.getvalue())
            else:
                for k, frame in enumerate(record["frames"]):
                    add(archive, f"{key}.frame{k:02d}.jpg", _jpeg(frame))
            add(archive, f"{key}.txt", str(record["text"]).encode("utf-8"))
            meta = {k: plain(record[k]) for k in WEBDATASET_META}
            add(archive, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return Path(path).stat().st_size


def write_pkl(records: list[dict], path: Path | str) -> int:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(records, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return Path(path).stat().st_size


def extract_shard(
    shard: str,
    list_path: Path | str,
    cfg: dict,
    continue_on_error: bool,
    threads: int,
    outputs: dict,
    progress: TextIO | None = None,
    storage: dict | None = None,
) -> dict:
    """Extract the clips of one shard list into its pkl and its index (with the failures and stats)."""
    stats = ShardStats(shard)
    stats.mark("imports")
    split, name = shard.split("/")
    clip_items = items_from_list(ShardLists.read(list_path, LIST_COLUMNS), split, ShardId.parse(name).index)
    settings = ExtractSettings.from_config(cfg, threads)
    failures = FailureLog(continue_on_error)
    reader = ItemReader(cfg.get("parquet_column", "auto"), "clip file", storage, VIDEO_COLUMNS)
    choice: dict = {}
    records, index = extract_items(clip_items, settings, failures, progress, on_item=stats.first_item_done,
                                   reader=reader, choice=choice)
    reader.close()
    size = write_pkl(records, outputs["pkl"])
    if outputs.get("tar"):
        size += write_webdataset(records, outputs["tar"], shard, cfg["webdataset"])
    stats.ok, stats.failed = len(records), len(failures)
    stats.counts = {"frames": sum(len(r["frames"]) for r in records)}
    stats.extra = {"bytes": size, "backend": settings.backend, "repeated": int(index["repeated"].sum()),
                   **({"decoder_choice": choice} if choice else {}), **scheduler_ids()}
    data = stats.as_dict()
    write_parquet(index, outputs["index"], "video.shard_index", metadata={"stats": data})
    log.info("shard %s: %s", shard, data)
    return data


def shard_failures(index: pd.DataFrame) -> pd.DataFrame:
    """The failures table rows of one shard index."""
    failed = index[index["status"] == "failed"]
    return failures_frame(Failure(r.clip_id, r.path, "decode", r.reason_code, r.note) for r in failed.itertuples())
