"""Dynamic batching: concurrent requests are scored together in one forward pass.

Requests put their preprocessed inputs on a queue and await a future. One worker task takes
the first waiting item, then waits at most ``max_wait`` seconds for more, up to
``max_batch`` items, and scores them in one call on a single scoring thread (the event
loop keeps accepting requests meanwhile). ``max_batch = 1`` turns batching off.

A batch mixes the rows of several clients, so a batch that fails is scored again row by row:
only the row that fails gets the error, every other row its logit.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import attrs


@attrs.define
class Item:
    """One row to score: the vision encoder's inputs (or None) and the text (or None)."""

    vision: object
    text: str | None
    future: asyncio.Future = None


class Batcher:
    """Collects :class:`Item` s into batches and scores each batch with ``score(items) -> logits``."""

    def __init__(self, score, *, max_batch=16, max_wait=0.005, on_batch=None):
        self.score = score
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait))
        self.on_batch = on_batch or (lambda size, seconds: None)
        self._queue = None
        self._task = None
        # one thread: torch / onnxruntime already use every core inside a call
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcore-score")

    def start(self):
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self):
        """Finish what is queued, then stop the worker (graceful shutdown)."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._executor.shutdown(wait=True)

    async def submit(self, items):
        """Queue ``items`` (one request's rows) and wait for their logits."""
        loop = asyncio.get_running_loop()
        for item in items:
            item.future = loop.create_future()
            self._queue.put_nowait(item)
        return [await item.future for item in items]

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                await self._score_batch(loop, batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _score_batch(self, loop, batch):
        started = time.perf_counter()
        try:
            logits = await loop.run_in_executor(self._executor, self.score, batch)
        except Exception as exc:  # noqa: BLE001 - any scoring failure is answered, never lost
            if len(batch) == 1:
                _answer(batch[0], error=exc)
                return
            for item in batch:  # one row's failure must not fail the other clients' rows
                await self._score_batch(loop, [item])
            return
        self.on_batch(len(batch), time.perf_counter() - started)
        for item, logit in zip(batch, logits, strict=True):
            _answer(item, logit=float(logit))


def _answer(item, *, logit=None, error=None):
    """Resolve an item's future (unless its request is gone: cancelled by a disconnect)."""
    if item.future.done():
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(logit)
