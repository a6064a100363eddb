"""The adaptive in-flight limit on a fake clock: it follows the measured latency between its floor and its cap."""

from __future__ import annotations

from infermesh.admission import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_window(limit: AdaptiveLimit, clock: Clock, latency_s: float, offered: int) -> int:
    """`offered` requests at once (as many as the limit admits), all taking `latency_s`; returns the refused."""
    tokens, refused = [], 0
    for _ in range(offered):
        token = limit.try_acquire()
        if token is None:
            refused += 1
        else:
            tokens.append(token)
    clock.now += latency_s
    for token in tokens:
        limit.release(token)
    return refused


def test_slow_answers_shrink_the_limit_fast_answers_under_pressure_grow_it_back() -> None:
    clock = Clock()
    changes: list[int] = []
    limit = AdaptiveLimit(256, target_s=0.025, min_limit=4, window=16, clock=clock, on_change=changes.append)
    assert limit.limit == 256
    for _ in range(10):  # overload: every window's p90 is 8x the target
        run_window(limit, clock, 0.200, offered=300)
    assert limit.limit < 32 and changes[0] == 128  # halved per window while far over the target
    assert run_window(limit, clock, 0.200, offered=300) > 0  # the excess is refused, not queued
    low = limit.limit
    for _ in range(50):  # the pressure stays, answers are fast again: the limit climbs back
        run_window(limit, clock, 0.005, offered=300)
    assert limit.limit > low + 20
    assert limit.inflight == 0


def test_the_limit_does_not_grow_without_pressure_nor_leave_its_bounds() -> None:
    clock = Clock()
    limit = AdaptiveLimit(64, target_s=0.025, min_limit=8, initial=16, window=8, clock=clock)
    for _ in range(20):
        run_window(limit, clock, 0.001, offered=4)  # fast, and never near the limit: nothing to grow for
    assert limit.limit == 16
    for _ in range(100):
        run_window(limit, clock, 1.0, offered=100)
    assert limit.limit == 8  # the floor
    for _ in range(200):
        run_window(limit, clock, 0.001, offered=100)
    assert limit.limit == 64  # the static cap


def test_an_infinite_target_is_a_static_cap() -> None:
    limit = AdaptiveLimit(3, target_s=float("inf"), window=1)
    tokens = [limit.try_acquire() for _ in range(3)]
    assert None not in tokens and limit.try_acquire() is None
    assert limit.full() and limit.inflight == 3  # asked without taking
    for token in tokens:
        assert token is not None
        limit.release(token)
    assert limit.limit == 3 and limit.inflight == 0 and not limit.full()
