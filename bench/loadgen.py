"""The load generator: closed loop (fixed concurrency) and open loop (Poisson arrivals) over asyncio.

A workload is an async callable `send(i) -> tag | None`: it issues request number `i` and returns an optional
tag for a successful answer (e.g. "defaulted" when the response says features were defaulted); it raises on
failure, and the failure is counted by its gRPC status code.

What is measured, as perf_analyzer measures it:
- a warm-up runs first and is discarded;
- the measured requests are those sent during the measurement window; each is awaited to completion, so a
  request that fails is counted even when it fails after the window (nothing is lost from the counts);
- latency is from the send (open loop: from the scheduled arrival, so a late send counts against the
  system and coordinated omission cannot hide queueing) to the answer;
- p50/p90/p95/p99 over successful requests, nearest rank: the ceil(p/100 * n)-th smallest;
- throughput = successful answers that arrived during the window / window length (perf_analyzer's).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

Send = Callable[[int], Awaitable[str | None]]
PERCENTILES = (50, 90, 95, 99)
OK = "OK"


def status_code(error: BaseException) -> str:
    """The gRPC status code name of a failure ("UNAVAILABLE"), whichever client raised it."""
    status = getattr(error, "status", None)
    if callable(status):  # tritonclient.utils.InferenceServerException: "StatusCode.UNAVAILABLE"
        text = status()
        if text:
            return str(text).removeprefix("StatusCode.")
    if isinstance(error, grpc.aio.AioRpcError | grpc.RpcError) and hasattr(error, "code"):
        return error.code().name
    if isinstance(error, TimeoutError):
        return "CLIENT_TIMEOUT"
    return f"CLIENT_{type(error).__name__}"


def _message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    text = message() if callable(message) else None
    if not text and hasattr(error, "details") and callable(error.details):
        text = error.details()
    return str(text or error)[:200]


def nearest_rank(sorted_values: Sequence[float], percentile: float) -> float:
    """perf_analyzer's percentile: the ceil(p/100 * n)-th smallest value (1-based); NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(percentile / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class ProgressSink(Protocol):
    """Where a run reports progress (the rich bar in the CLI; nothing in tests)."""

    def begin(self, label: str, total_s: float) -> Any: ...
    def update(self, handle: Any, elapsed_s: float, ok: int, failed: int) -> None: ...
    def end(self, handle: Any) -> None: ...


class NoProgress:
    def begin(self, label: str, total_s: float) -> None:
        return None

    def update(self, handle: Any, elapsed_s: float, ok: int, failed: int) -> None:
        return None

    def end(self, handle: Any) -> None:
        return None


@dataclass(slots=True)
class Sample:
    start: float  # seconds from the window start (negative: warm-up); open loop: the scheduled arrival
    end: float
    code: str  # "OK" or a status code name
    tag: str | None = None
    sent: float | None = None  # open loop: when the generator actually sent it (later if it ran behind)


@dataclass
class Recording:
    """Every request of one run; times are seconds relative to the start of the measurement window."""

    label: str
    mode: str  # "closed" or "open"
    duration_s: float
    warmup_s: float
    concurrency: int | None = None
    rate_rps: float | None = None
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, what) marked during the run
    origin: float = 0.0  # time.perf_counter() of the window start
    error_examples: dict[str, list[str]] = field(default_factory=dict)  # distinct messages per status code
    client_dropped: int = 0  # open loop: arrivals not sent because max_outstanding requests were pending
    send_lag_ms_p99: float | None = None  # open loop: how late the generator sent vs the schedule

    def measured(self) -> list[Sample]:
        return [s for s in self.samples if 0.0 <= s.start < self.duration_s]

    def mark(self, what: str, at: float) -> None:
        self.events.append((round(at, 3), what))


def summarize(
    samples: Sequence[Sample], window: tuple[float, float], completed_in_window: int | None = None
) -> dict[str, Any]:
    """Counts by status code and tag, throughput and nearest-rank latency percentiles (ms) of the OK ones.

    Throughput is `completed_in_window` (successful answers that arrived inside `window`; by default counted
    from `samples`) over the window's length.
    """
    start, end = window
    latencies = sorted((s.end - s.start) * 1000 for s in samples if s.code == OK)
    codes = Counter(s.code for s in samples)
    tags = Counter(s.tag for s in samples if s.code == OK and s.tag)
    ok = codes.pop(OK, 0)
    if completed_in_window is None:
        completed_in_window = sum(1 for s in samples if s.code == OK and start <= s.end < end)
    length = end - start
    summary: dict[str, Any] = {
        "requests": len(samples),
        "ok": ok,
        "errors": dict(sorted(codes.items())),
        "tags": dict(sorted(tags.items())),
        "throughput_rps": round(completed_in_window / length, 2) if length > 0 else math.nan,
        "latency_ms": {f"p{p}": _round(nearest_rank(latencies, p)) for p in PERCENTILES},
    }
    summary["latency_ms"]["mean"] = _round(sum(latencies) / len(latencies)) if latencies else math.nan
    summary["latency_ms"]["max"] = _round(latencies[-1]) if latencies else math.nan
    return summary


def result(recording: Recording) -> dict[str, Any]:
    """The JSON form of a run: its parameters plus `summarize` over its measured requests."""
    out: dict[str, Any] = {"label": recording.label, "mode": recording.mode}
    if recording.concurrency is not None:
        out["concurrency"] = recording.concurrency
    if recording.rate_rps is not None:
        out["rate_rps"] = round(recording.rate_rps, 2)
    out["duration_s"] = recording.duration_s
    out["warmup_s"] = recording.warmup_s
    measured = recording.measured()
    # Throughput as perf_analyzer: answers completed inside the window, whenever they were sent.
    completed = sum(1 for s in recording.samples if s.code == OK and 0.0 <= s.end < recording.duration_s)
    out.update(summarize(measured, (0.0, recording.duration_s), completed))
    if recording.mode == "open":
        # The same answers timed from when they actually left the generator: the gap to `latency_ms` is the
        # generator's own lag (a saturated client), which the scheduled-arrival figures charge to the system.
        from_send = sorted(
            (s.end - (s.sent if s.sent is not None else s.start)) * 1000 for s in measured if s.code == OK
        )
        out["latency_from_send_ms"] = {f"p{p}": _round(nearest_rank(from_send, p)) for p in PERCENTILES}
        out["offered_rps"] = round((len(measured) + recording.client_dropped) / recording.duration_s, 2)
        out["client_dropped"] = recording.client_dropped
        out["send_lag_ms_p99"] = recording.send_lag_ms_p99
    if recording.error_examples:
        out["error_examples"] = dict(sorted(recording.error_examples.items()))
    if recording.events:
        out["events"] = [{"t_s": t, "event": what} for t, what in recording.events]
    return out


def timeline(recording: Recording, bucket_s: float = 0.5) -> list[dict[str, Any]]:
    """Per time bucket (by completion time): OK, failed, tagged counts and p99 of the OK latencies."""
    if not recording.samples:
        return []
    first = min(0.0, min(s.start for s in recording.samples))
    last = max(s.end for s in recording.samples)
    buckets: dict[int, list[Sample]] = {}
    for sample in recording.samples:
        if sample.start < 0:
            continue
        buckets.setdefault(math.floor(sample.end / bucket_s), []).append(sample)
    rows = []
    for index in range(math.floor(max(first, 0) / bucket_s), math.floor(last / bucket_s) + 1):
        group = buckets.get(index, [])
        latencies = sorted((s.end - s.start) * 1000 for s in group if s.code == OK)
        rows.append(
            {
                "t_s": round(index * bucket_s, 3),
                "ok": len(latencies),
                "failed": sum(1 for s in group if s.code != OK),
                "tagged": sum(1 for s in group if s.code == OK and s.tag),
                "p99_ms": _round(nearest_rank(latencies, 99)),
            }
        )
    return rows


def _round(value: float) -> float:
    return round(value, 3) if not math.isnan(value) else math.nan


class LoadRun:
    """One run in progress; `now()` is the time on the run's clock, for marking events from a scenario."""

    def __init__(self, recording: Recording, progress: ProgressSink) -> None:
        self.recording = recording
        self.progress = progress
        self.ok = 0
        self.failed = 0

    @property
    def origin(self) -> float:
        return self.recording.origin

    @origin.setter
    def origin(self, value: float) -> None:
        self.recording.origin = value

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def mark(self, what: str) -> None:
        self.recording.mark(what, self.now())

    async def _issue(self, send: Send, i: int, start: float) -> None:
        """`start` is the perf_counter() the request counts from."""
        sent = time.perf_counter()
        try:
            tag = await send(i)
            code = OK
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every failure is data: counted by its status code
            code, tag = status_code(error), None
            examples = self.recording.error_examples.setdefault(code, [])
            if len(examples) < 3 and (message := _message(error)) not in examples:
                examples.append(message)
        end = time.perf_counter()
        if code == OK:
            self.ok += 1
        else:
            self.failed += 1
        origin = self.origin
        late = sent - start > 1e-4
        self.recording.samples.append(Sample(start - origin, end - origin, code, tag, sent - origin if late else None))

    async def _ticker(self, handle: Any, total_s: float) -> None:
        while True:
            elapsed = min(total_s, self.now() + self.recording.warmup_s)
            self.progress.update(handle, elapsed, self.ok, self.failed)
            await asyncio.sleep(0.2)


async def closed_loop(
    send: Send,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    *,
    label: str = "",
    progress: ProgressSink | None = None,
    started: Callable[[LoadRun], None] | None = None,
) -> Recording:
    """`concurrency` workers, each sending its next request as soon as the previous one answered."""
    recording = Recording(label, "closed", duration_s, warmup_s, concurrency=concurrency)
    run = LoadRun(recording, progress or NoProgress())
    run.origin = time.perf_counter() + warmup_s
    stop_at = run.origin + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while (now := time.perf_counter()) < stop_at:
            await run._issue(send, next(counter), now)

    handle = run.progress.begin(label, warmup_s + duration_s)
    ticker = asyncio.create_task(run._ticker(handle, warmup_s + duration_s))
    if started is not None:
        started(run)
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        ticker.cancel()
        run.progress.end(handle)
    return recording


async def open_loop(
    send: Send,
    rate_rps: float,
    duration_s: float,
    warmup_s: float = 1.0,
    *,
    label: str = "",
    seed: int = 0,
    max_outstanding: int = 8192,
    progress: ProgressSink | None = None,
    started: Callable[[LoadRun], None] | None = None,
) -> Recording:
    """Requests at Poisson arrivals of mean rate `rate_rps`, whether or not earlier ones have answered."""
    recording = Recording(label, "open", duration_s, warmup_s, rate_rps=rate_rps)
    run = LoadRun(recording, progress or NoProgress())
    rng = random.Random(seed)
    run.origin = time.perf_counter() + warmup_s
    stop_at = run.origin + duration_s
    pending: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    handle = run.progress.begin(label, warmup_s + duration_s)
    ticker = asyncio.create_task(run._ticker(handle, warmup_s + duration_s))
    if started is not None:
        started(run)
    scheduled = time.perf_counter()
    i = 0
    try:
        while True:
            scheduled += rng.expovariate(rate_rps)
            if scheduled >= stop_at:
                break
            delay = scheduled - time.perf_counter()
            # Always yield: when the generator runs late it must still let the answers in.
            await asyncio.sleep(max(0.0, delay))
            now = time.perf_counter()
            if scheduled >= run.origin:
                lags.append((now - scheduled) * 1000)
            if len(pending) >= max_outstanding:
                if scheduled >= run.origin:
                    recording.client_dropped += 1
                continue
            task = asyncio.create_task(run._issue(send, i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.gather(*pending)
    finally:
        ticker.cancel()
        run.progress.end(handle)
        for task in pending:
            task.cancel()
    lags.sort()
    recording.send_lag_ms_p99 = _round(nearest_rank(lags, 99)) if lags else None
    return recording
