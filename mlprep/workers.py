"""Items prepared ahead in worker processes, delivered in order: the reader half of every shard job that
decodes files (images, audio) beside a model."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _single_thread_worker(_: int) -> None:
    from threadpoolctl import threadpool_limits

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


def _as_is(item):
    return item


def in_order(dataset: torch.utils.data.Dataset, workers: int, ahead: int = 4, pin_memory: bool = False) -> Iterator:
    """dataset[0], dataset[1], ... (or what an iterable dataset yields, interleaved over the workers): in this
    process when workers <= 0, else prepared up to `ahead` items per worker in advance by `workers`
    single-threaded processes (the dataset returns errors as values, so none stops the loop). The workers start
    at once, before the first item is asked for: a job can build its model while they read. `pin_memory`
    page-locks each item (its `pin_memory()`) in a thread, for copies to a GPU that do not stall."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # it splits its own work among the workers
        if workers <= 0:
            return iter(dataset)
    elif workers <= 0 or not len(dataset):
        return (dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=ahead,
                                            worker_init_fn=_single_thread_worker, collate_fn=_as_is,
                                            pin_memory=pin_memory))
