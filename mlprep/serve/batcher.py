"""Dynamic batching: the items of concurrent requests go to the model together.

Requests put their items on a queue and wait for their own results. One worker takes whatever is queued (up to
`max_batch` items), waits at most `max_wait_s` for more when the batch is not full, and runs the model on the
batch in the model thread it is given (the model is never called from two threads at once). While a batch runs, the
next requests queue up and form the next batch: under load batches fill themselves, and a lone request waits at
most `max_wait_s` beyond its own forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, run: Callable[[list], list], max_batch: int = 64, max_wait_s: float = 0.002,
                 name: str = "model", observe: Callable[[int], None] | None = None,
                 executor: ThreadPoolExecutor | None = None):
        """`run(items) -> results`: one result per item, in order; an item's result may be an Exception (that
        item's failure). `observe(batch size)` is called for each batch (metrics). `executor`: the one-thread
        pool the batches run in (share one between batchers: see mlprep.serve.app's model thread)."""
        self.run, self.max_batch, self.max_wait_s, self.name = run, max_batch, max_wait_s, name
        self.observe = observe
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._own = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._own:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: list) -> list:
        """Results of `items` (values or Exceptions), in order, batched with whatever else is queued."""
        if self._queue is None:
            self.start()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.done()]  # a client that gave up
            if not batch:
                continue
            if self.observe is not None:
                self.observe(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - the batch's failure is each of its items'
                log.exception("%s: a batch of %d failed", self.name, len(batch))
                results = [err] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
