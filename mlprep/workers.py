"""Items prepared ahead in worker processes, delivered in order: the reader half of every shard job that
decodes files (images, audio) beside a model."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEEP_BLOCKS_UP_TO = 32 << 20  # glibc's largest mmap threshold
KEEP_FREED_UP_TO = 256 << 20
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Lets this process (and the readers it forks) reuse the memory it frees instead of handing it back to the
    kernel at once. glibc's allocator maps every block above its threshold (128 KiB at first) anew and unmaps it
    when freed, and returns a heap top beyond its trim threshold: a reader that builds a photo's SIFT pyramid,
    decodes an image or renders a chunk's float intermediates took those pages again, zero-filled, on every item.
    Blocks up to 32 MiB now come from the heap, and up to 256 MiB of it stays when freed: a process keeps at most
    its own peak, which it reaches anyway. On a 2-core Xeon this took a sku reader with the shipped config from
    ~40 to ~25 ms a photo at shop-floor share 1/16 (system time 7-8 s -> 0.3 s over 160 photos; docs/gpu.md). True
    where set (glibc); elsewhere nothing changes."""
    global _kept
    if _kept is None:
        import ctypes

        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _kept = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                       KEEP_FREED_UP_TO))
    return _kept


def _single_thread_worker(_: int) -> None:
    from threadpoolctl import threadpool_limits

    keep_freed_memory()  # set before the fork already; a reader started another way sets it itself

    torch.set_num_threads(1)  # the workers share the job's cores; the model keeps its threads
    threadpool_limits(1)  # numpy's BLAS as well


GPU_AUTO_WORKERS = 4


def resolve_workers(value: int | str, device: torch.device, threads: int, heavy: bool = False) -> int:
    """`decode_workers: auto`: on a CPU, none for a job of fewer than 4 threads and one above: a worker takes
    cycles from the model's threads, and each time it preempts one of them the whole operator waits (on 2
    cores, 0.73x encoder-only with a worker against 0.90x inline, measured); on a GPU, up to 4 and never every
    thread of the job, leaving its main process (which feeds the device) a core: on an H200 with 16 host cores
    (2026-12-04) the sku shard job ran at 4,225 / 5,909 / 4,367 / 2,424 views/s with 1 / 4 / 8 / 16 workers and
    resemblyzer's at 481 / 432 / 260 utterances/s with 4 / 8 / 16: more workers crowded the feeding process.
    `heavy` readers (sku_index's local features and shop-floor queries: 30-80 ms of CPU an image, against 1-2 ms
    for its views) get every thread of a GPU job but one: there the readers, not the feeding process, set the
    pace (4 of them give ~50-130 images/s, a few hundred views/s)."""
    if value != "auto":
        return int(value)
    if device.type == "cpu":
        return 0 if threads < 4 else 1
    if heavy:
        return max(1, threads - 1)
    return max(1, min(GPU_AUTO_WORKERS, threads - 1))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def each_in_threads(prepare: Callable[[T], R], args: Iterable[T]) -> list[R]:
    """[prepare(a) for a in args], in order, on as many threads as torch has in this process. In a job's own
    process (its readers inline, `decode_workers: 0`) the model waits while they work, so the cores it would use
    are free: decoding, resizing, hashing and SIFT release the GIL, so the items of a chunk are prepared side by
    side instead of one core working while the others idle. In a reader process (one thread: `_single_thread_worker`)
    one after the other. `prepare` must touch nothing another item's call changes (each item is its own)."""
    args = list(args)
    threads = torch.get_num_threads()
    if threads <= 1 or len(args) <= 1:
        return [prepare(a) for a in args]
    key = (os.getpid(), threads)  # a forked child never uses its parent's pool (its threads were not forked)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="reader")
    return list(_POOLS[key].map(prepare, args))


def _as_is(item):
    return item


def in_order(dataset: torch.utils.data.Dataset, workers: int, ahead: int = 4, pin_memory: bool = False) -> Iterator:
    """dataset[0], dataset[1], ... (or what an iterable dataset yields, interleaved over the workers): in this
    process when workers <= 0, else prepared up to `ahead` items per worker in advance by `workers`
    single-threaded processes (the dataset returns errors as values, so none stops the loop). The workers start
    at once, before the first item is asked for: a job can build its model while they read. `pin_memory`
    page-locks each item (its `pin_memory()`) in a thread, for copies to a GPU that do not stall."""
    keep_freed_memory()  # before the readers fork: they and this process reuse what they free
    if isinstance(dataset, torch.utils.data.IterableDataset):  # it splits its own work among the workers
        if workers <= 0:
            return iter(dataset)
    elif workers <= 0 or not len(dataset):
        return (dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=ahead,
                                            worker_init_fn=_single_thread_worker, collate_fn=_as_is,
                                            pin_memory=pin_memory))
