"""The circuit breaker's states, on a fake clock."""

from __future__ import annotations

from infermesh.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_probes_once_and_closes_on_success() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(failure_threshold=3, open_s=1.0, clock=clock, on_change=changes.append)
    breaker.failure()
    breaker.success()  # a success in between: the count starts again
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == BreakerState.CLOSED
    breaker.failure()
    assert breaker.state == BreakerState.OPEN and not breaker.allow()
    clock.now = 0.99
    assert not breaker.allow()
    clock.now = 1.0
    assert breaker.allow() and breaker.state == BreakerState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.success()
    assert breaker.state == BreakerState.CLOSED and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_again_and_a_released_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0, clock=clock)
    breaker.failure()
    clock.now = 1.0
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == BreakerState.OPEN and not breaker.allow()
    clock.now = 2.0
    assert breaker.allow()
    breaker.release()  # e.g. the probe was cancelled: another call may probe
    assert breaker.allow() and breaker.state == BreakerState.HALF_OPEN
