"""Dynamic batching of one model version: a bounded queue in front of one forward-pass thread.

Requests wait until `max_batch_size` rows are queued or `max_queue_delay_us` has passed since the first
of them arrived; then one forward pass runs over their concatenated rows in a dedicated worker thread
(torch releases the GIL, so the event loop keeps accepting meanwhile) and the outputs are split back.
A full queue refuses at once (QueueFull → RESOURCE_EXHAUSTED); a request whose deadline passed while it
queued is dropped before compute (DeadlineExceeded); a cancelled caller is simply left out of its batch.
A forward pass that raises over several requests is bisected (its halves run again, in turn, on the same thread)
so that only the requests whose own rows fail get the error; a retry never outlives a request's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from infermesh import metrics, telemetry
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, DomainError, QueueFull, Unavailable
from infermesh.model_config import DynamicBatching
from infermesh.priority import DEFAULT_PRIORITY, enqueue
from infermesh.statistics import ModelStatistics

log = logging.getLogger(__name__)

SERVICE = "model_service"

Arrays = dict[str, np.ndarray]
RunBatch = Callable[[Arrays], Arrays]


@dataclass(eq=False, slots=True)
class _Request:
    inputs: Arrays
    rows: int
    deadline: Deadline | None
    future: asyncio.Future[Arrays]
    enqueued_at: float  # loop.time(): the batching window is measured on the loop's clock
    enqueued_ns: int  # wall clock, for spans
    signature: tuple[tuple[str, tuple[int, ...]], ...]
    dispatched_ns: int = 0
    forward_start_ns: int = 0
    forward_end_ns: int = 0
    batch_rows: int = 0
    taken: bool = False  # off the queue (in a batch, dropped or failed)
    priority: int = DEFAULT_PRIORITY  # smaller leaves the queue first (infermesh.priority)


def _signature(inputs: Arrays) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Requests join a batch only if their non-batch dimensions agree (variable dims may differ)."""
    return tuple((name, array.shape[1:]) for name, array in inputs.items())


class Batcher:
    """Queue + batching loop + worker thread of one model version."""

    def __init__(
        self,
        model: str,
        version: str,
        run_batch: RunBatch,
        max_batch_size: int,
        batching: DynamicBatching,
        *,
        device: str = "cpu",
        inject_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        thread_initializer: Callable[[], None] | None = None,
        statistics: ModelStatistics | None = None,
        cold_window_s: float = 60.0,
        replica: str = "",
        inline_forward_max_s: float = 0.0,
    ) -> None:
        self.model = model
        self.version = version
        self._run_batch = run_batch
        self._max_rows = max_batch_size
        self._enabled = batching.enabled
        self._delay_s = batching.max_queue_delay_us / 1e6
        self._max_queue = batching.max_queue_size
        self._inject_delay_s = inject_delay_s
        self._clock = clock  # deadlines are absolute times on this clock (time.monotonic by default)
        self._pending: deque[_Request] = deque()
        self._pending_rows = 0
        self._running: list[_Request] = []
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.statistics = statistics if statistics is not None else ModelStatistics(model, version)
        # One thread: forward passes of a model version never overlap, so batches do not fight for cores.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"forward-{model}-{version}", initializer=thread_initializer
        )
        # At low load (nothing else queued) a forward pass that recently took under inline_forward_max_s runs on
        # the event loop itself: handing it to the worker thread and back costs two thread wake-ups, more than a
        # tiny model's pass. The average starts above the bound, so the first passes always take the thread.
        self._inline_max_s = inline_forward_max_s if not inject_delay_s else 0.0
        self._forward_average_s = math.inf
        self._forward_average_rows = 1.0  # the passes averaged: a larger batch is expected to take longer in proportion
        self._thread_initializer = thread_initializer
        self._loop_thread_configured = False
        self._queue_depth = metrics.QUEUE_DEPTH.labels(SERVICE, model, version, "")
        self._batch_size = metrics.BATCH_SIZE.labels(SERVICE, model)
        self._queue_wait = metrics.QUEUE_WAIT.labels(SERVICE, model)
        self._forward_latency = metrics.FORWARD_LATENCY.labels(model, version, device)
        self._rejected = metrics.ADMISSION_REJECTED.labels(SERVICE, "queue_full")
        # Cold starts (M8): a batcher starts when its version becomes READY. Requests answered within cold_window_s
        # are counted, the first one's latency kept; after the window a request costs one attribute check.
        self._cold_until = clock() + cold_window_s
        self._cold = cold_window_s > 0
        self._first_answered = False
        self._cold_requests = metrics.COLD_REQUESTS.labels(model, version, replica)
        self._first_latency = metrics.FIRST_REQUEST_LATENCY.labels(model, version, replica)
        metrics.VERSION_READY_TIME.labels(model, version, replica).set(time.time())

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (the bounded quantity)."""
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.model}")

    async def submit(
        self,
        inputs: Arrays,
        rows: int,
        deadline: Deadline | None = None,
        timing: dict[str, float] | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> Arrays:
        """Queue `rows` rows ([rows, ...] arrays) and wait for their outputs. Raises QueueFull at once if full.
        `timing`, when given, gets the seconds the request queued ("queue") and its batch's forward pass took
        ("forward")."""
        if self._closed:
            raise Unavailable(f"model '{self.model}' is shutting down")
        if deadline is not None and deadline.at <= self._clock():
            raise DeadlineExceeded(f"model '{self.model}': deadline passed before the request was queued")
        if len(self._pending) >= self._max_queue:
            self._rejected.inc()
            raise QueueFull(f"model '{self.model}' queue is full")
        self.start()
        loop = asyncio.get_running_loop()
        request = _Request(
            inputs=inputs,
            rows=rows,
            deadline=deadline,
            future=loop.create_future(),
            enqueued_at=loop.time(),
            enqueued_ns=time.time_ns(),
            signature=_signature(inputs),
            priority=priority,
        )
        enqueue(self._pending, request)
        self._pending_rows += rows
        self._queue_depth.set(len(self._pending))
        self._notify()
        try:
            outputs = await request.future
            if self._cold:
                self._count_cold(request)
            if timing is not None:
                timing["queue"] = (request.dispatched_ns - request.enqueued_ns) / 1e9
                timing["forward"] = (request.forward_end_ns - request.forward_start_ns) / 1e9
            return outputs
        except asyncio.CancelledError:
            if not request.taken:  # free its queue slot now rather than when the loop reaches it
                self._pending.remove(request)
                self._pending_rows -= rows
                self._queue_depth.set(len(self._pending))
            raise
        finally:
            self._record_spans(request)

    def _count_cold(self, request: _Request) -> None:
        if self._clock() > self._cold_until:
            self._cold = False
            return
        self._cold_requests.inc()
        if not self._first_answered:
            self._first_answered = True
            self._first_latency.set((time.time_ns() - request.enqueued_ns) / 1e9)

    def _record_spans(self, request: _Request) -> None:
        # From the caller's coroutine, so that the spans parent under its server span.
        if not request.dispatched_ns:
            return
        attributes: dict[str, telemetry.AttributeValue] = {
            "batch_size": request.batch_rows,
            "model": self.model,
            "version": self.version,
        }
        telemetry.record_span("batch.queue_wait", request.enqueued_ns, request.dispatched_ns, **attributes)
        if request.forward_end_ns:
            telemetry.record_span("model.forward", request.forward_start_ns, request.forward_end_ns, **attributes)

    def _notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, at_most_s: float | None) -> None:
        """Until a request arrives (or `at_most_s` seconds pass); a future + timer is cheaper than wait_for."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(at_most_s, self._notify) if at_most_s is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                await self._wait(None)
            if self._enabled:
                # Let the batch grow until it is full or the first request has waited max_queue_delay.
                close_at = self._pending[0].enqueued_at + self._delay_s
                while self._pending and self._pending_rows < self._max_rows:
                    remaining = close_at - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _take(self) -> list[_Request]:
        """Pop the next batch off the queue, failing requests whose deadline already passed."""
        batch: list[_Request] = []
        rows = 0
        now = self._clock()
        while self._pending:
            request = self._pending[0]
            expired = request.deadline is not None and request.deadline.at <= now
            if not expired and batch:
                full = not self._enabled or rows + request.rows > self._max_rows
                if full or request.signature != batch[0].signature:
                    break
            self._pending.popleft()
            self._pending_rows -= request.rows
            request.taken = True
            if request.future.done():
                continue
            if expired:
                request.future.set_exception(
                    DeadlineExceeded(f"model '{self.model}': deadline passed while the request was queued")
                )
                continue
            batch.append(request)
            rows += request.rows
        self._queue_depth.set(len(self._pending))
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        rows = sum(request.rows for request in batch)
        dispatched_ns = time.time_ns()
        for request in batch:
            request.dispatched_ns = dispatched_ns
            request.batch_rows = rows
            self._queue_wait.observe((dispatched_ns - request.enqueued_ns) / 1e9)
        self._batch_size.observe(rows)
        self._running = batch
        loop = asyncio.get_running_loop()
        try:
            parts = [request.inputs for request in batch]
            expected_s = self._forward_average_s * max(1.0, rows / self._forward_average_rows)
            if not self._pending and expected_s < self._inline_max_s:
                start_ns, input_ns, end_ns, outputs = self._forward_inline(parts)
            else:
                start_ns, input_ns, end_ns, outputs = await loop.run_in_executor(self._executor, self._forward, parts)
        except asyncio.CancelledError:
            self._fail(batch, Unavailable(f"model '{self.model}' is shutting down"))
            raise
        except Exception as error:
            if len(batch) == 1:
                self._failed(batch[0], error)
            else:  # still in `_running`: close() and drain() see the requests being isolated
                await self._isolate(batch)
            return
        finally:
            self._running = []
        self._answer(batch, rows, start_ns, input_ns, end_ns, outputs)

    def _answer(
        self, batch: list[_Request], rows: int, start_ns: int, input_ns: int, end_ns: int, outputs: Arrays
    ) -> None:
        """Split a successful forward pass's outputs back to its requests and count it."""
        split_from = time.perf_counter_ns()
        try:
            self._split(batch, rows, outputs, start_ns, end_ns)
        except Exception as error:
            log.exception("model output does not split", extra={"fields": {"model": self.model}})
            self._fail(batch, error)
            return
        output_ns = time.perf_counter_ns() - split_from
        statistics = self.statistics
        statistics.record_batch(
            len(batch), rows, input_ns, end_ns - start_ns - input_ns, output_ns, end_ns // 1_000_000
        )
        for request in batch:
            statistics.queue.add(request.dispatched_ns - request.enqueued_ns)

    async def _isolate(self, batch: list[_Request]) -> None:
        """The forward pass over `batch` (two requests or more) raised: run its halves again, one after the other,
        and split each half that raises in turn, so that only the requests whose own rows fail get an error. One
        bad request costs at most 2·log2(len(batch)) more passes, and failed passes are capped (a model failing on
        everything does not cost 2n-1 passes); nothing is recomputed for a request that was cancelled or whose
        deadline passed meanwhile (that one gets DeadlineExceeded)."""
        loop = asyncio.get_running_loop()
        todo = self._halves(batch)  # a stack: the left half runs first
        # Enough failed passes to single out two bad requests; past it the model fails on (nearly) everything, and
        # bisecting further would hold up the queue behind it for 2n-1 passes: the rest get the error at once.
        failures_left = 4 * max(1, (len(batch) - 1).bit_length())
        try:
            while todo:
                part = self._live(todo.pop())
                if not part:
                    continue
                rows = sum(request.rows for request in part)
                try:
                    parts = [request.inputs for request in part]
                    start_ns, input_ns, end_ns, outputs = await loop.run_in_executor(
                        self._executor, self._forward, parts
                    )
                except Exception as error:  # not CancelledError: that one ends the loop below
                    failures_left -= 1
                    if len(part) == 1:
                        self._failed(part[0], error)
                    elif failures_left <= 0:
                        for request in [*part, *(r for rest in todo for r in self._live(rest))]:
                            self._failed(request, error)
                        todo.clear()
                    else:
                        todo.extend(self._halves(part))
                    continue
                for request in part:
                    request.batch_rows = rows
                self._answer(part, rows, start_ns, input_ns, end_ns, outputs)
        except asyncio.CancelledError:
            self._fail(batch, Unavailable(f"model '{self.model}' is shutting down"))
            raise

    def _halves(self, batch: list[_Request]) -> list[list[_Request]]:
        """The two halves of a failed batch, by request and in order, as a stack (the left half on top)."""
        log.info(
            "batch split",
            extra={"fields": {"model": self.model, "version": self.version, "requests": len(batch)}},
        )
        middle = len(batch) // 2
        return [batch[middle:], batch[:middle]]

    def _live(self, batch: list[_Request]) -> list[_Request]:
        """The requests of `batch` still worth a forward pass: a cancelled one is left out, one whose deadline
        passed fails with DeadlineExceeded."""
        now = self._clock()
        live: list[_Request] = []
        for request in batch:
            if request.future.done():
                continue
            if request.deadline is not None and request.deadline.at <= now:
                request.future.set_exception(
                    DeadlineExceeded(f"model '{self.model}': deadline passed before the request was recomputed")
                )
                continue
            live.append(request)
        return live

    def _failed(self, request: _Request, error: Exception) -> None:
        """A request's own rows made the forward pass raise: a DomainError reaches its caller as it is; anything
        else is logged here (the method handler answers INTERNAL without its text)."""
        if not isinstance(error, DomainError):
            log.error(
                "forward pass failed",
                exc_info=error,
                extra={"fields": {"model": self.model, "version": self.version}},
            )
        if not request.future.done():
            request.future.set_exception(error)

    def _forward_inline(self, parts: list[Arrays]) -> tuple[int, int, int, Arrays]:
        """_forward on the event loop's thread, configured as the worker thread is (torch's thread count)."""
        if not self._loop_thread_configured:
            self._loop_thread_configured = True
            if self._thread_initializer is not None:
                self._thread_initializer()
        return self._forward(parts)

    def _forward(self, parts: list[Arrays]) -> tuple[int, int, int, Arrays]:
        """In the worker thread: concatenation too, so that large batches do not hold up the event loop. Returns
        the wall-clock start, the nanoseconds the inputs took to assemble, the wall-clock end and the outputs."""
        start_ns = time.time_ns()
        started = time.perf_counter()
        if len(parts) == 1:
            inputs = parts[0]
        else:
            inputs = {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}
        input_ns = int((time.perf_counter() - started) * 1e9)
        if self._inject_delay_s:
            time.sleep(self._inject_delay_s)  # simulated slow replica: part of the forward pass on purpose
        outputs = self._run_batch(inputs)
        took_s = time.perf_counter() - started
        self._forward_latency.observe(took_s)
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        average = self._forward_average_s
        if average == math.inf:
            self._forward_average_s, self._forward_average_rows = took_s, float(max(rows, 1))
        else:
            self._forward_average_s = average + 0.2 * (took_s - average)
            self._forward_average_rows += 0.2 * (max(rows, 1) - self._forward_average_rows)
        return start_ns, input_ns, time.time_ns(), outputs

    def _split(self, batch: list[_Request], rows: int, outputs: Arrays, start_ns: int, end_ns: int) -> None:
        for name, array in outputs.items():
            if array.shape[:1] != (rows,):
                raise RuntimeError(f"output '{name}' has shape {list(array.shape)} for a batch of {rows} rows")
        offset = 0
        for request in batch:
            request.forward_start_ns = start_ns
            request.forward_end_ns = end_ns
            if not request.future.done():  # a caller cancelled mid-forward just does not get its rows
                request.future.set_result(
                    {name: array[offset : offset + request.rows] for name, array in outputs.items()}
                )
            offset += request.rows

    @staticmethod
    def _fail(batch: list[_Request], error: BaseException) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    async def drain(self, timeout_s: float) -> None:
        """Take no new requests, let those queued or computing finish (for up to `timeout_s`), then close."""
        self._closed = True  # no request joins from now on, so these are the last
        unanswered = [request.future for request in (*self._pending, *self._running) if not request.future.done()]
        if unanswered:
            await asyncio.wait(unanswered, timeout=timeout_s)
        await self.close()

    async def close(self) -> None:
        """Stop the loop; every queued or computing request fails with Unavailable so nothing hangs."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        error = Unavailable(f"model '{self.model}' is shutting down")
        self._fail(self._running, error)
        for request in self._pending:
            request.taken = True
        self._fail(list(self._pending), error)
        self._pending.clear()
        self._pending_rows = 0
        self._queue_depth.set(0)
        self._executor.shutdown(wait=False, cancel_futures=True)
