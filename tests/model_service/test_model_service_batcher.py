"""Unit tests of the dynamic batcher: no torch, no network; the 'model' is a numpy function."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import REGISTRY

from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, InvalidInput, QueueFull, Unavailable
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


async def test_a_fast_pass_at_low_load_runs_on_the_event_loop_and_a_slow_or_queued_one_in_the_thread() -> None:
    """inline_forward_max_s: after a first pass in the worker thread measured fast, a lone request's pass runs on the
    event loop's thread (configured by the same initializer); a pass expected to take longer, or one with requests
    queued behind it, goes to the worker thread."""
    initialised: list[str] = []
    forward_threads: list[str] = []
    delay_s = 0.0

    def model(inputs: Arrays) -> Arrays:
        forward_threads.append(threading.current_thread().name)
        if delay_s:
            time.sleep(delay_s)
        return {"y": inputs["x"] * 2}

    batching = DynamicBatching(enabled=False, max_queue_size=8)
    batcher = Batcher(
        "m",
        "1",
        model,
        8,
        batching,
        thread_initializer=lambda: initialised.append(threading.current_thread().name),
        inline_forward_max_s=0.05,
    )
    loop_thread = threading.current_thread().name
    try:
        for value in range(3):  # one at a time: nothing queued behind any of them
            result = await batcher.submit(rows(1, start=value), 1)
            np.testing.assert_array_equal(result["y"], rows(1, start=value)["x"] * 2)
        worker = forward_threads[0]
        assert worker != loop_thread  # nothing measured yet: the first pass takes the thread
        assert forward_threads[1:] == [loop_thread, loop_thread]
        assert initialised == [worker, loop_thread]

        # Requests queued behind a pass: the thread, so the loop keeps taking requests meanwhile.
        forward_threads.clear()
        await asyncio.gather(*(batcher.submit(rows(1), 1) for _ in range(3)))
        assert forward_threads[0] == worker

        # A pass that got slow (0.3 s: the average passes 0.05 s at once) sends the next lone one back to the thread.
        delay_s = 0.3
        forward_threads.clear()
        for _ in range(2):
            await batcher.submit(rows(1), 1)
        assert forward_threads == [loop_thread, worker]
    finally:
        await batcher.close()


async def test_inline_forward_is_off_by_default() -> None:
    forward_threads: set[str] = set()

    def model(inputs: Arrays) -> Arrays:
        forward_threads.add(threading.current_thread().name)
        return {"y": inputs["x"]}

    batcher = Batcher("m", "1", model, 8, DynamicBatching(enabled=False, max_queue_size=8))
    try:
        for _ in range(3):
            await batcher.submit(rows(1), 1)
    finally:
        await batcher.close()
    assert threading.current_thread().name not in forward_threads


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


# Failure isolation: a request whose rows make the forward pass raise fails alone; the batch is bisected.


class PoisonModel:
    """y = 2x, but a forward pass over any row whose x[:, 0] is negative raises `error`. Records every pass's rows
    and the wall clock at which it began; `on_fail` runs (in the worker thread) after a failing pass; with
    `gate_after_fail`, every pass after the first failure waits until `release` is set."""

    def __init__(
        self,
        error: Callable[[], Exception] = lambda: RuntimeError("poisoned row 1.5"),
        on_fail: Callable[[], None] | None = None,
        gate_after_fail: bool = False,
    ) -> None:
        self.error = error
        self.on_fail = on_fail
        self.gate_after_fail = gate_after_fail
        self.failed = False
        self.release = threading.Event()
        self.passes: list[np.ndarray] = []
        self.started_ns: list[int] = []
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def __call__(self, inputs: Arrays) -> Arrays:
        x = inputs["x"]
        self.passes.append(x.copy())
        self.started_ns.append(time.time_ns())
        self.loop.call_soon_threadsafe(self.started.put_nowait, len(x))
        if self.failed and self.gate_after_fail and not self.release.wait(10):
            raise RuntimeError("test never released the forward pass")
        if (x[:, 0] < 0).any():
            self.failed = True
            if self.on_fail is not None:
                self.on_fail()
            raise self.error()
        return {"y": x * 2}


def one_row(value: float) -> Arrays:
    return {"x": np.array([[value, value + 0.5]], dtype=np.float32)}


async def submit_all(batcher: Batcher, values: list[float]) -> list[Arrays | BaseException]:
    """One single-row request per value, all queued before the batch closes; each result or error."""
    tasks = [asyncio.create_task(batcher.submit(one_row(v), 1)) for v in values]
    return await asyncio.gather(*tasks, return_exceptions=True)


def assert_answered(values: list[float], results: list[Arrays | BaseException], poisoned: set[int]) -> None:
    for i, (value, result) in enumerate(zip(values, results, strict=True)):
        if i in poisoned:
            assert isinstance(result, BaseException), f"request {i} was poisoned yet answered"
        else:
            assert not isinstance(result, BaseException), f"clean request {i} failed: {result!r}"
            np.testing.assert_array_equal(result["y"], one_row(value)["x"] * 2)


async def test_a_poisoned_request_fails_alone_and_the_rest_of_its_batch_is_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=5_000_000)  # 8 one-row requests fill one batch
    values = [float(10 * i) for i in range(8)]
    values[5] = -1.0
    with caplog.at_level(logging.INFO, logger=batcher_module.__name__):
        results = await submit_all(batcher, values)
    await batcher.close()

    assert_answered(values, results, poisoned={5})
    error = results[5]
    assert isinstance(error, RuntimeError) and str(error) == "poisoned row 1.5"  # the object run_batch raised
    assert len(model.passes[0]) == 8  # one batch first
    assert len(model.passes) <= 1 + 2 * math.ceil(math.log2(8))  # bisection: 2 passes a level
    # A clean row is in at most one pass a level: the whole batch, then the halves holding it until one answers.
    for value in values:
        if value >= 0:
            assert sum(int((p[:, 0] == value).sum()) for p in model.passes) <= 1 + math.ceil(math.log2(8))
    failed = [r for r in caplog.records if r.getMessage() == "forward pass failed"]
    assert len(failed) == 1  # once, for the request that failed, not for every failed pass
    assert failed[0].fields == {"model": "m", "version": "1"}  # type: ignore[attr-defined]
    assert "poisoned" not in failed[0].getMessage()
    splits = [r.fields for r in caplog.records if r.getMessage() == "batch split"]  # type: ignore[attr-defined]
    assert splits[0] == {"model": "m", "version": "1", "requests": 8}


async def test_a_clean_batch_runs_one_forward_pass() -> None:
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=5_000_000)
    values = [float(10 * i) for i in range(8)]
    results = await submit_all(batcher, values)
    await batcher.close()
    assert_answered(values, results, poisoned=set())
    assert [len(p) for p in model.passes] == [8]


async def test_two_poisoned_requests_both_fail_and_the_others_are_answered() -> None:
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=5_000_000)
    values = [float(10 * i) for i in range(8)]
    values[1] = values[6] = -1.0
    results = await submit_all(batcher, values)
    await batcher.close()
    assert_answered(values, results, poisoned={1, 6})
    assert len(model.passes) <= 1 + 2 * 2 * math.ceil(math.log2(8))


async def test_a_model_failing_on_everything_costs_a_bounded_number_of_passes() -> None:
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=16, delay_us=5_000_000)
    values = [-1.0] * 16  # every request poisoned: full bisection would take 2n-1 = 31 passes
    results = await submit_all(batcher, values)
    await batcher.close()
    assert_answered(values, results, poisoned=set(range(16)))
    assert len(model.passes) <= 1 + 4 * 4  # the first pass, then at most 4·log2(16) failed ones


async def test_a_domain_error_reaches_the_poisoned_request_as_it_is(caplog: pytest.LogCaptureFixture) -> None:
    model = PoisonModel(error=lambda: InvalidInput("x: negative amount"))
    batcher = make_batcher(model, max_batch_size=4, delay_us=5_000_000)
    values = [1.0, -1.0, 3.0, 4.0]
    with caplog.at_level(logging.INFO, logger=batcher_module.__name__):
        results = await submit_all(batcher, values)
    await batcher.close()
    assert_answered(values, results, poisoned={1})
    assert isinstance(results[1], InvalidInput) and str(results[1]) == "x: negative amount"
    assert not [r for r in caplog.records if r.getMessage() == "forward pass failed"]  # a domain error is no fault


async def test_isolation_counts_only_the_passes_that_answered() -> None:
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=8, delay_us=5_000_000)
    values = [float(10 * i) for i in range(8)]
    values[5] = -1.0
    await submit_all(batcher, values)
    await batcher.close()
    statistics = batcher.statistics
    answered = [p for p in model.passes if not (p[:, 0] < 0).any()]
    assert statistics.execution_count == len(answered) == 3  # [0-3], [6-7], [4]
    assert statistics.inference_count == 7
    assert sorted(statistics.batches) == [1, 2, 4]
    assert statistics.queue.count == 7


async def test_each_request_gets_the_timing_of_the_pass_that_answered_it(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[str, int, dict[str, object]]] = []

    def record_span(name: str, start_ns: int, end_ns: int, **attributes: object) -> None:
        recorded.append((name, start_ns, attributes))

    monkeypatch.setattr(batcher_module.telemetry, "record_span", record_span)
    model = PoisonModel()
    batcher = make_batcher(model, max_batch_size=4, delay_us=5_000_000)
    await submit_all(batcher, [1.0, 2.0, 3.0, -1.0])  # [1, 2] answers at the second pass, [3] at the fourth
    await batcher.close()

    forward = sorted(
        (start_ns, attributes["batch_size"]) for name, start_ns, attributes in recorded if name == "model.forward"
    )
    assert [size for _, size in forward] == [2, 2, 1]  # the failed request has no forward span
    assert forward[0][0] > model.started_ns[0]  # not the failed pass of all four
    assert forward[0][0] <= model.started_ns[1] < forward[2][0] <= model.started_ns[3]


async def test_a_request_whose_deadline_passes_during_isolation_is_not_recomputed() -> None:
    now = [100.0]
    model = PoisonModel(on_fail=lambda: now.__setitem__(0, 150.0))  # the failing pass outlasts `late`'s deadline
    batcher = make_batcher(model, max_batch_size=4, delay_us=5_000_000, clock=lambda: now[0])
    deadlines = [Deadline(200.0), Deadline(101.0), Deadline(200.0), Deadline(200.0)]
    values = [1.0, 2.0, -1.0, 4.0]
    tasks = [
        asyncio.create_task(batcher.submit(one_row(v), 1, deadline=d)) for v, d in zip(values, deadlines, strict=True)
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()

    assert isinstance(results[1], DeadlineExceeded)
    assert isinstance(results[2], RuntimeError)
    assert_answered(values, results, poisoned={1, 2})
    assert len(model.passes[0]) == 4
    assert sum(int((p[:, 0] == 2.0).sum()) for p in model.passes) == 1  # only in the pass that failed


async def test_close_during_isolation_fails_what_is_left_with_unavailable() -> None:
    model = PoisonModel(gate_after_fail=True)
    batcher = make_batcher(model, max_batch_size=4, delay_us=5_000_000)
    tasks = [asyncio.create_task(batcher.submit(one_row(v), 1)) for v in (1.0, -1.0, 3.0, 4.0)]
    assert await model.started.get() == 4  # the whole batch: it fails
    assert await model.started.get() == 2  # the first half's retry, held in the worker thread
    await batcher.close()
    model.release.set()
    for task in tasks:
        with pytest.raises(Unavailable):
            await task
    assert len(model.passes) == 2  # nothing more ran after close()


async def test_drain_lets_isolation_finish() -> None:
    model = PoisonModel(gate_after_fail=True)
    batcher = make_batcher(model, max_batch_size=4, delay_us=5_000_000)
    values = [1.0, -1.0, 3.0, 4.0]
    tasks = [asyncio.create_task(batcher.submit(one_row(v), 1)) for v in values]
    await model.started.get()
    await model.started.get()
    draining = asyncio.create_task(batcher.drain(10.0))
    model.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await draining
    assert_answered(values, results, poisoned={1})


async def test_queued_requests_are_served_by_priority_then_in_order() -> None:
    model = RecordingModel(gated=True)
    batcher = make_batcher(model, enabled=False)  # one request per forward pass: the order is visible
    first = asyncio.create_task(batcher.submit(one_row(0.0), 1))
    await model.started.get()  # the worker is busy with the first request; the rest queue
    queued = [(1.0, 10), (2.0, 10), (3.0, 1), (4.0, 20), (5.0, 1)]
    tasks = [asyncio.create_task(batcher.submit(one_row(v), 1, priority=p)) for v, p in queued]
    await until(lambda: batcher.queued == len(queued))
    model.release.set()
    await asyncio.gather(first, *tasks)
    await batcher.close()
    assert [float(batch[0, 0]) for batch in model.batches] == [0.0, 3.0, 5.0, 1.0, 2.0, 4.0]


async def test_cold_requests_are_counted_for_cold_window_s_after_ready_and_the_first_ones_latency_kept() -> None:
    """Cold starts (M8): the batcher starts when its version becomes READY; requests within the window count."""
    now = [100.0]
    batcher = Batcher(
        "cold",
        "1",
        lambda arrays: arrays,
        8,
        DynamicBatching(max_queue_delay_us=0),
        clock=lambda: now[0],
        cold_window_s=30.0,
        replica="r0",
    )
    labels = {"model": "cold", "version": "1", "replica": "r0"}
    try:
        for _ in range(3):
            await batcher.submit(rows(1), 1)
        now[0] = 131.0  # past the window: no longer cold
        await batcher.submit(rows(1), 1)
        assert REGISTRY.get_sample_value("infermesh_cold_requests_total", labels) == 3
        first = REGISTRY.get_sample_value("infermesh_cold_start_first_request_seconds", labels)
        assert first is not None and 0 < first < 5
        ready = REGISTRY.get_sample_value("infermesh_version_ready_timestamp_seconds", labels)
        assert ready is not None and abs(ready - time.time()) < 60
    finally:
        await batcher.close()
