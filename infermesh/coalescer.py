"""Coalesces concurrent requests for one model into shared downstream calls (the gateway's router calls,
the router's feature reads and model calls).

No timer: a request is dispatched at once when a batch slot is free (no added latency at low load);
while every slot is busy, arriving requests queue (bounded) and leave together as the next batch.
Under load batches therefore grow by themselves, and the model service's batcher sees real batches.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from infermesh import metrics, telemetry
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, Overloaded, Unavailable
from infermesh.priority import DEFAULT_PRIORITY, enqueue


@dataclass(eq=False, slots=True)
class Pending:
    """One client request waiting for its share of a batch."""

    payload: Any
    rows: int
    deadline: Deadline
    size: int = 0  # bytes, where the batch has a byte budget
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    trace_context: Any = field(default_factory=telemetry.current_context)  # the request's trace, when traced
    queued_at_ns: int = 0  # time.time_ns() when it had to queue for a batch (0: it did not wait)
    priority: int = DEFAULT_PRIORITY  # smaller leaves the queue first (infermesh.priority)
    queue_until: float = math.inf  # monotonic: still queued then, it is refused (its `timeout` parameter)
    batch: list[Pending] | None = None  # the batch it was dispatched in, and that batch's task
    batch_task: asyncio.Task[None] | None = None


BatchRunner = Callable[[list[Pending]], Awaitable[None]]


def _leave(pending: Pending) -> None:
    """The caller of `pending` is gone (cancelled, or its deadline passed). If every caller of the batch it is in
    has gone, the batch is cancelled too: its downstream calls are cancelled with it, and the hops below drop the
    work from their queues. (Checked here, on the rare path, rather than with a callback on every request.)"""
    batch, task = pending.batch, pending.batch_task
    if batch is not None and task is not None and not task.done() and all(p.future.cancelled() for p in batch):
        task.cancel()


class Coalescer:
    def __init__(
        self,
        service: str,
        model: str,
        run_batch: BatchRunner,
        max_rows: int,
        max_inflight: int,
        max_pending: int,
        max_size: int | None = None,
        version: str = "",
        group: str = "",
    ) -> None:
        self._max_size = max_size
        self._service = service
        self._run_batch = run_batch
        self._max_rows = max_rows
        self._max_inflight = max_inflight
        self._max_pending = max_pending
        self._queue: deque[Pending] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._depth_labels = (service, model, version, group)
        self._depth = metrics.QUEUE_DEPTH.labels(*self._depth_labels)
        self._batch_size = metrics.BATCH_SIZE.labels(service, model)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight: the coalescer can be dropped without losing anything."""
        return not self._queue and self._inflight == 0

    def _admit(self, count: int) -> None:
        if len(self._queue) + count > self._max_pending:
            metrics.ADMISSION_REJECTED.labels(self._service, "coalescer_queue_full").inc()
            raise Overloaded(f"{self._service} queue is full, retry later")

    async def submit(self, pending: Pending) -> Any:
        if not self._queue and self._inflight < self._max_inflight:
            # Nothing to share with: run the batch of one in the caller's own task, without the task and
            # shielded wait a queued request needs (the whole path at low load).
            remaining = pending.deadline.at - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before dispatch")
            self._inflight += 1
            try:
                async with asyncio.timeout(remaining):
                    await self._run([pending])
            except TimeoutError as error:
                raise DeadlineExceeded("deadline exceeded while waiting for the model") from error
            finally:
                if pending.future.done() and not pending.future.cancelled():
                    pending.future.exception()  # retrieved: raised below or superseded by the timeout
            return pending.future.result()
        self._admit(1)
        if pending.trace_context is not None:
            pending.queued_at_ns = time.time_ns()
        enqueue(self._queue, pending)
        self._dispatch()
        if pending.queue_until < pending.deadline.at and pending.batch is None:
            # A queue timeout (rare): refused the moment it passes while the request still waits for a batch.
            try:
                done, _ = await asyncio.wait((pending.future,), timeout=pending.queue_until - time.monotonic())
            except asyncio.CancelledError:
                pending.future.cancel()
                _leave(pending)
                raise
            if not done and pending.batch is None:
                pending.future.cancel()
                raise Unavailable("request timeout expired: still queued after its timeout")
        try:
            # On timeout or cancellation the future is cancelled too, which tells the batch this caller is gone.
            async with asyncio.timeout(pending.deadline.at - time.monotonic()):
                return await pending.future
        except TimeoutError as error:
            _leave(pending)
            raise DeadlineExceeded("deadline exceeded while waiting for the model") from error
        except asyncio.CancelledError:
            _leave(pending)
            raise

    async def submit_many(self, pendings: list[Pending]) -> list[Any]:
        """Several requests at once (e.g. the segments of a gateway batch); each gets its own result or
        exception, in order. Admitted all or none."""
        self._admit(len(pendings))
        now_ns = time.time_ns()
        for pending in pendings:
            if pending.trace_context is not None:
                pending.queued_at_ns = now_ns
        for pending in pendings:
            enqueue(self._queue, pending)
        self._dispatch()
        futures = [p.future for p in pendings]
        deadline = Deadline.latest([p.deadline for p in pendings])
        try:
            await asyncio.wait(futures, timeout=deadline.remaining())
        finally:
            for pending in pendings:
                if not pending.future.done():
                    pending.future.cancel()
                    _leave(pending)
        return [
            DeadlineExceeded("deadline exceeded while waiting for the model")
            if future.cancelled()
            else (future.exception() or future.result())
            for future in futures
        ]

    def _dispatch(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch = self._take()
            if not batch:
                break
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            for pending in batch:  # so that a caller who leaves can tell whether anyone still waits for it
                pending.batch, pending.batch_task = batch, task
        self._depth.set(len(self._queue))

    def _take(self) -> list[Pending]:
        batch: list[Pending] = []
        rows = size = 0
        now = time.monotonic()
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # caller cancelled
                self._queue.popleft()
                continue
            if pending.deadline.at <= now:
                self._queue.popleft()
                pending.future.set_exception(DeadlineExceeded("deadline exceeded before dispatch"))
                continue
            if pending.queue_until <= now:
                self._queue.popleft()
                pending.future.set_exception(Unavailable("request timeout expired: still queued after its timeout"))
                continue
            if batch and (
                rows + pending.rows > self._max_rows
                or (self._max_size is not None and size + pending.size > self._max_size)
            ):
                break
            self._queue.popleft()
            batch.append(pending)
            rows += pending.rows
            size += pending.size
        return batch

    async def _run(self, batch: list[Pending]) -> None:
        try:
            self._batch_size.observe(sum(p.rows for p in batch))
            with telemetry.batch_context(self._service, batch):
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
            for pending in batch:  # no cycle left between the requests, their batch and its task
                pending.batch = pending.batch_task = None
            self._inflight -= 1
            self._dispatch()

    def forget_metrics(self) -> None:
        """Drop this queue's gauge series (the queue itself is being dropped)."""
        metrics.QUEUE_DEPTH.remove(*self._depth_labels)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
