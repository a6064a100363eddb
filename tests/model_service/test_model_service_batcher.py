"""Unit tests of the dynamic batcher: no torch, no network; the 'model' is a numpy function."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import REGISTRY

from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, QueueFull, Unavailable
from infermesh.model_config import DynamicBatching
from model_service import batcher as batcher_module
from model_service.batcher import Batcher

Arrays = dict[str, np.ndarray]


class RecordingModel:
    """y = 2x; records the rows of every batch. With `gated`, each forward waits until released."""

    def __init__(self, gated: bool = False, fail_first: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.gated = gated
        self.fail_first = fail_first
        self.release = threading.Event()
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def __call__(self, inputs: Arrays) -> Arrays:
        x = inputs["x"]
        self.batches.append(x.copy())
        self.loop.call_soon_threadsafe(self.started.put_nowait, len(x))
        if self.gated and not self.release.wait(10):
            raise RuntimeError("test never released the forward pass")
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom")
        return {"y": x * 2}


def make_batcher(
    model: Callable[[Arrays], Arrays],
    max_batch_size: int = 8,
    delay_us: int = 5_000_000,
    queue_size: int = 64,
    enabled: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> Batcher:
    batching = DynamicBatching(enabled=enabled, max_queue_delay_us=delay_us, max_queue_size=queue_size)
    return Batcher("m", "1", model, max_batch_size, batching, clock=clock)


def rows(count: int, start: float = 0.0) -> Arrays:
    return {"x": (np.arange(count * 2, dtype=np.float32) + start).reshape(count, 2)}


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Yield to the event loop until `predicate` holds (the condition is the synchronisation)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - the batcher exposes no event for its queue length
            await asyncio.sleep(0)


def batch_count(model: str = "m") -> float:
    return REGISTRY.get_sample_value("infermesh_batch_size_count", {"service": "model_service", "model": model}) or 0.0


async def test_concurrent_requests_form_one_batch_and_are_split_back() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=5_000_000)
    sizes = [3, 2, 1, 2]  # 8 rows: the batch is full, so it must not wait for the 5 s window
    requests = [rows(n, start=100 * i) for i, n in enumerate(sizes)]
    batches_before = batch_count()
    started = time.perf_counter()
    results = await asyncio.gather(*(batcher.submit(r, len(r["x"])) for r in requests))
    elapsed = time.perf_counter() - started
    await batcher.close()

    assert [len(b) for b in model.batches] == [8]
    np.testing.assert_array_equal(model.batches[0], np.concatenate([r["x"] for r in requests]))
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], request["x"] * 2)
    assert elapsed < 2.0, "a full batch waited for the batching window"
    assert batch_count() == batches_before + 1


async def test_window_closes_a_partial_batch() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=20_000)
    result = await batcher.submit(rows(3), 3)
    await batcher.close()
    assert [len(b) for b in model.batches] == [3]
    np.testing.assert_array_equal(result["y"], rows(3)["x"] * 2)


async def test_requests_that_do_not_fit_go_to_the_next_batch() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=20_000)
    first, second = rows(5), rows(5, start=50)
    results = await asyncio.gather(batcher.submit(first, 5), batcher.submit(second, 5))
    await batcher.close()
    assert [len(b) for b in model.batches] == [5, 5]
    np.testing.assert_array_equal(results[0]["y"], first["x"] * 2)
    np.testing.assert_array_equal(results[1]["y"], second["x"] * 2)


async def test_full_queue_refuses_at_once() -> None:
    model = RecordingModel(gated=True)
    batcher = make_batcher(model, delay_us=0, queue_size=2)
    in_forward = asyncio.create_task(batcher.submit(rows(1), 1))
    assert await model.started.get() == 1  # first request left the queue and is computing
    queued = [asyncio.create_task(batcher.submit(rows(1, start=10 * i), 1)) for i in (1, 2)]
    await until(lambda: batcher.queued == 2)

    started = time.perf_counter()
    with pytest.raises(QueueFull, match="model 'm' queue is full"):
        await batcher.submit(rows(1), 1)
    assert time.perf_counter() - started < 0.1  # refused without waiting for the blocked forward pass

    model.release.set()
    await in_forward
    results = await asyncio.gather(*queued)
    await batcher.close()
    assert [len(b) for b in model.batches] == [1, 2]  # the two queued requests shared the next batch
    np.testing.assert_array_equal(results[1]["y"], rows(1, start=20)["x"] * 2)


async def test_expired_deadline_is_dropped_before_compute() -> None:
    now = [100.0]
    model = RecordingModel(gated=True)
    batcher = make_batcher(model, delay_us=0, clock=lambda: now[0])
    blocker = asyncio.create_task(batcher.submit(rows(1), 1))
    await model.started.get()
    late = asyncio.create_task(batcher.submit(rows(2, start=10), 2, deadline=Deadline(101.0)))
    on_time = asyncio.create_task(batcher.submit(rows(3, start=20), 3, deadline=Deadline(200.0)))
    await until(lambda: batcher.queued == 2)
    now[0] = 150.0  # `late` expires while it waits behind the blocked forward pass
    model.release.set()

    with pytest.raises(DeadlineExceeded):
        await late
    np.testing.assert_array_equal((await on_time)["y"], rows(3, start=20)["x"] * 2)
    await blocker
    await batcher.close()
    assert [len(b) for b in model.batches] == [1, 3]  # the late rows never reached the model


async def test_deadline_already_passed_is_refused_without_compute() -> None:
    model = RecordingModel()
    batcher = make_batcher(model)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows(1), 1, deadline=Deadline(time.monotonic() - 1))
    await batcher.close()
    assert model.batches == []


async def test_disabled_batching_runs_each_request_alone() -> None:
    model = RecordingModel()
    batcher = make_batcher(model, delay_us=5_000_000, enabled=False)
    requests = [rows(2, start=10 * i) for i in range(4)]
    results = await asyncio.gather(*(batcher.submit(r, 2) for r in requests))
    await batcher.close()
    assert [len(b) for b in model.batches] == [2, 2, 2, 2]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["y"], request["x"] * 2)


async def test_cancelled_callers_do_not_break_the_batch() -> None:
    model = RecordingModel(gated=True)
    batcher = make_batcher(model, delay_us=0)
    computing = asyncio.create_task(batcher.submit(rows(1), 1))
    await model.started.get()
    cancelled_queued = asyncio.create_task(batcher.submit(rows(2, start=10), 2))
    kept = asyncio.create_task(batcher.submit(rows(3, start=20), 3))
    await until(lambda: batcher.queued == 2)
    cancelled_queued.cancel()
    computing.cancel()  # mid-forward: its rows are computed but nobody receives them
    await until(lambda: batcher.queued == 1)  # the cancelled request gave its queue slot back
    model.release.set()

    np.testing.assert_array_equal((await kept)["y"], rows(3, start=20)["x"] * 2)
    assert cancelled_queued.cancelled() and computing.cancelled()
    # The loop survived both cancellations and keeps serving.
    np.testing.assert_array_equal((await batcher.submit(rows(1, start=5), 1))["y"], rows(1, start=5)["x"] * 2)
    await batcher.close()
    assert [len(b) for b in model.batches] == [1, 3, 1]


async def test_forward_error_fails_its_batch_only() -> None:
    model = RecordingModel(fail_first=True)
    batcher = make_batcher(model, delay_us=0)
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit(rows(1), 1)
    np.testing.assert_array_equal((await batcher.submit(rows(1), 1))["y"], rows(1)["x"] * 2)
    await batcher.close()


async def test_close_fails_queued_and_computing_requests() -> None:
    model = RecordingModel(gated=True)
    batcher = make_batcher(model, delay_us=0)
    computing = asyncio.create_task(batcher.submit(rows(1), 1))
    await model.started.get()
    queued = asyncio.create_task(batcher.submit(rows(1), 1))
    await until(lambda: batcher.queued == 1)
    await batcher.close()
    model.release.set()
    for task in (computing, queued):
        with pytest.raises(Unavailable):
            await task
    with pytest.raises(Unavailable):
        await batcher.submit(rows(1), 1)


async def test_spans_are_recorded_from_the_callers_task(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[str, asyncio.Task[object] | None, int, int, dict[str, object]]] = []

    def record_span(name: str, start_ns: int, end_ns: int, **attributes: object) -> None:
        recorded.append((name, asyncio.current_task(), start_ns, end_ns, attributes))

    monkeypatch.setattr(batcher_module.telemetry, "record_span", record_span)
    batcher = make_batcher(RecordingModel(), max_batch_size=4, delay_us=5_000_000)
    tasks = [asyncio.create_task(batcher.submit(rows(2), 2)) for _ in range(2)]
    await asyncio.gather(*tasks)
    await batcher.close()

    assert sorted((name, tasks.index(task)) for name, task, *_ in recorded) == [
        ("batch.queue_wait", 0),
        ("batch.queue_wait", 1),
        ("model.forward", 0),
        ("model.forward", 1),
    ]
    for _, _, start_ns, end_ns, attributes in recorded:
        assert attributes["batch_size"] == 4
        assert 0 < start_ns <= end_ns


async def test_forward_runs_in_one_initialised_worker_thread() -> None:
    initialised: list[str] = []
    forward_threads: set[str] = set()

    def model(inputs: Arrays) -> Arrays:
        forward_threads.add(threading.current_thread().name)
        return {"y": inputs["x"]}

    batching = DynamicBatching(enabled=False, max_queue_size=8)
    batcher = Batcher(
        "m", "1", model, 8, batching, thread_initializer=lambda: initialised.append(threading.current_thread().name)
    )
    await asyncio.gather(*(batcher.submit(rows(1), 1) for _ in range(4)))
    await batcher.close()
    assert len(forward_threads) == 1 and initialised == list(forward_threads)
    assert threading.current_thread().name not in forward_threads  # the event loop's thread stays free


async def test_each_version_has_its_own_queue_depth_series() -> None:
    """Two versions of one model served at once: two series, not one that the last writer wins."""
    from prometheus_client import REGISTRY

    batchers = [
        Batcher("two_versions", version, lambda arrays: arrays, 8, DynamicBatching(max_queue_delay_us=0))
        for version in ("1", "2")
    ]
    try:
        for batcher in batchers:
            await batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1)
        for version in ("1", "2"):
            labels = {"service": "model_service", "model": "two_versions", "version": version, "group": ""}
            assert REGISTRY.get_sample_value("infermesh_queue_depth", labels) == 0.0
    finally:
        for batcher in batchers:
            await batcher.close()
