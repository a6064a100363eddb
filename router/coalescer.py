"""Coalesces concurrent requests for one model into shared feature reads and model calls.

No timer: a request is dispatched at once when a batch slot is free (no added latency at low load);
while every slot is busy, arriving requests queue (bounded) and leave together as the next batch.
Under load batches therefore grow by themselves, and the model service's batcher sees real batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from infermesh import metrics
from infermesh.errors import DeadlineExceeded, Overloaded


@dataclass(eq=False, slots=True)
class Pending:
    """One client request waiting for its share of a batch."""

    payload: Any
    rows: int
    deadline: float  # monotonic seconds
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


BatchRunner = Callable[[list[Pending]], Awaitable[None]]


class Coalescer:
    def __init__(self, model: str, run_batch: BatchRunner, max_rows: int, max_inflight: int, max_pending: int) -> None:
        self._run_batch = run_batch
        self._max_rows = max_rows
        self._max_inflight = max_inflight
        self._max_pending = max_pending
        self._queue: deque[Pending] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._depth = metrics.QUEUE_DEPTH.labels("router", model)
        self._batch_size = metrics.BATCH_SIZE.labels("router", model)

    async def submit(self, pending: Pending) -> Any:
        if len(self._queue) >= self._max_pending:
            metrics.ADMISSION_REJECTED.labels("router", "coalescer_queue_full").inc()
            raise Overloaded("router queue is full, retry later")
        self._queue.append(pending)
        self._dispatch()
        remaining = pending.deadline - time.monotonic()
        try:
            # shield: our own timeout must not cancel the future the batch will complete.
            return await asyncio.wait_for(asyncio.shield(pending.future), remaining)
        except TimeoutError as error:
            raise DeadlineExceeded("deadline exceeded while waiting for the model") from error
        finally:
            if not pending.future.done():
                pending.future.cancel()  # tells the batch this caller is gone

    def _dispatch(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch = self._take()
            if not batch:
                break
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._depth.set(len(self._queue))

    def _take(self) -> list[Pending]:
        batch: list[Pending] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # caller cancelled
                self._queue.popleft()
                continue
            if pending.deadline <= now:
                self._queue.popleft()
                pending.future.set_exception(DeadlineExceeded("deadline exceeded before dispatch"))
                continue
            if batch and rows + pending.rows > self._max_rows:
                break
            self._queue.popleft()
            batch.append(pending)
            rows += pending.rows
        return batch

    async def _run(self, batch: list[Pending]) -> None:
        try:
            self._batch_size.observe(sum(p.rows for p in batch))
            await self._run_batch(batch)
        except BaseException as error:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        error if isinstance(error, Exception) else DeadlineExceeded("request cancelled")
                    )
            if not isinstance(error, Exception):
                raise
        finally:
            self._inflight -= 1
            self._dispatch()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
