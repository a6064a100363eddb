"""The shared coalescer: batches bounded by rows and by bytes, a request alone runs at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from infermesh.coalescer import Coalescer, Pending
from infermesh.deadline import Deadline
from infermesh.errors import InvalidInput, Unavailable
from infermesh.priority import DEFAULT_PRIORITY, queue_policy


def deadline(seconds: float = 5.0) -> Deadline:
    return Deadline.after(seconds)


async def test_queued_requests_leave_in_batches_bounded_by_rows_and_bytes() -> None:
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def run(batch: list[Pending]) -> None:
        batches.append([p.payload for p in batch])
        if len(batches) == 1:
            await gate.wait()  # the first request holds the only slot while the rest queue
        for pending in batch:
            pending.future.set_result(pending.payload)

    coalescer = Coalescer("gateway", "m", run, max_rows=3, max_inflight=1, max_pending=16, max_size=100)
    sizes = [10, 40, 40, 40, 10, 10, 10, 10]  # payload i is request i
    first = asyncio.create_task(coalescer.submit(Pending(0, 1, deadline(), size=sizes[0])))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.submit(Pending(i, 1, deadline(), size=sizes[i]))) for i in range(1, 8)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *rest) == list(range(8))
    # 1+2 = 80 bytes, + 3 would be 120 > 100: bytes cut the batch; then 3 rows cut [3, 4, 5]; then [6, 7].
    assert batches == [[0], [1, 2], [3, 4, 5], [6, 7]]


async def test_a_request_alone_runs_in_its_callers_task() -> None:
    callers: list[asyncio.Task | None] = []

    async def run(batch: list[Pending]) -> None:
        callers.append(asyncio.current_task())
        batch[0].future.set_result("ok")

    coalescer = Coalescer("router", "m", run, max_rows=8, max_inflight=2, max_pending=4)
    task = asyncio.create_task(coalescer.submit(Pending(None, 1, deadline())))
    assert await task == "ok"
    assert callers == [task]


async def test_a_batch_all_of_whose_callers_left_is_cancelled_and_one_with_a_caller_left_is_not() -> None:
    release_first = asyncio.Event()
    shared_started = asyncio.Event()
    cancelled: list[list[int]] = []

    async def run(batch: list[Pending]) -> None:
        payloads = [p.payload for p in batch]
        try:
            if payloads == [0]:
                await release_first.wait()
            else:
                shared_started.set()
                await asyncio.Event().wait()  # the downstream call that never answers
        except asyncio.CancelledError:
            cancelled.append(payloads)
            raise
        for pending in batch:
            pending.future.set_result(pending.payload)

    coalescer = Coalescer("router", "m", run, max_rows=2, max_inflight=1, max_pending=16)
    first = asyncio.create_task(coalescer.submit(Pending(0, 1, deadline())))
    await asyncio.sleep(0)  # the first request runs alone in its task and holds the only slot
    callers = [asyncio.create_task(coalescer.submit(Pending(i, 1, deadline()))) for i in (1, 2)]
    await asyncio.sleep(0)  # both queue
    release_first.set()
    assert await first == 0
    await shared_started.wait()  # requests 1 and 2 share a batch, now running in its own task
    callers[0].cancel()
    await asyncio.sleep(0)
    assert cancelled == []  # request 2 still waits for that batch
    callers[1].cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert cancelled == [[1, 2]]  # nobody is left: the batch (and its downstream call) is cancelled
    await asyncio.gather(*callers, return_exceptions=True)
    await asyncio.sleep(0)
    assert coalescer.idle


async def test_queued_requests_leave_by_priority_then_in_order_and_a_queue_timeout_refuses_at_once() -> None:
    release_first = asyncio.Event()
    order: list[str] = []

    async def run(batch: list[Pending]) -> None:
        if batch[0].payload == "holder":
            await release_first.wait()
        order.extend(p.payload for p in batch)
        for pending in batch:
            pending.future.set_result(pending.payload)

    coalescer = Coalescer("router", "m", run, max_rows=1, max_inflight=1, max_pending=16)
    holder = asyncio.create_task(coalescer.submit(Pending("holder", 1, deadline())))
    await asyncio.sleep(0)
    queued = [("a", 10), ("b", 10), ("urgent-1", 1), ("late", 20), ("urgent-2", 1), ("c", 10)]
    tasks = [asyncio.create_task(coalescer.submit(Pending(name, 1, deadline(), priority=p))) for name, p in queued]
    impatient = asyncio.create_task(
        coalescer.submit(Pending("impatient", 1, deadline(), queue_until=time.monotonic() + 0.02))
    )
    with pytest.raises(Unavailable, match="request timeout expired"):
        await impatient  # refused while the slot is still held, not when a batch would have formed
    assert not holder.done()
    release_first.set()
    await asyncio.gather(holder, *tasks)
    assert order == ["holder", "urgent-1", "urgent-2", "a", "b", "c", "late"]


def test_priority_and_timeout_parameters_are_checked() -> None:
    assert queue_policy({}) == (DEFAULT_PRIORITY, float("inf"))
    priority, until = queue_policy({"priority": 1, "timeout": 2_000_000})
    assert priority == 1 and 1.9 < until - time.monotonic() <= 2.0
    for bad in ({"priority": -1}, {"priority": "high"}, {"timeout": 1.5}, {"timeout": True}):
        with pytest.raises(InvalidInput, match="must be a non-negative integer"):
            queue_policy(bad)
