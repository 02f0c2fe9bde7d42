"""Items prepared ahead in worker processes, delivered in order: the reader half of every shard job that
decodes files (images, audio) beside a model."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _single_thread_worker(_: int) -> None:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)  # the workers share the job's cores; the model keeps its threads
    threadpool_limits(1)  # numpy's BLAS as well


def in_order(dataset: torch.utils.data.Dataset, workers: int, ahead: int = 4) -> Iterator:
    """dataset[0], dataset[1], ...: in this process when workers <= 0, else prepared up to `ahead` items
    per worker in advance by `workers` single-threaded processes (the dataset returns errors as values,
    so none stops the loop)."""
    if workers <= 0 or not len(dataset):
        yield from (dataset[i] for i in range(len(dataset)))
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=ahead,
                                           worker_init_fn=_single_thread_worker, collate_fn=lambda x: x)
