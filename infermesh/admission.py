"""Adaptive admission: how many requests a service works on at once follows the latency it measures (pure logic).

A fixed in-flight cap is either too high (under overload everything admitted queues, and every accepted request is
slow) or too low (capacity left unused). Like Envoy's adaptive concurrency filter and Netflix's concurrency-limits,
the limit is adjusted from what the admitted requests took: at the end of each window of completions, if their
90th percentile exceeded the latency target the limit shrinks by a factor (multiplicative decrease); if it did not,
and the limit was what held requests back, it grows by a step (additive increase). It stays between a floor and
the static cap. A request over the limit is refused at once: queueing it would only make it, and the ones behind
it, late.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class AdaptiveLimit:
    def __init__(
        self,
        max_limit: int,
        target_s: float,
        *,
        min_limit: int = 4,
        initial: int | None = None,
        window: int = 64,
        decrease: float = 0.9,
        increase: int = 2,
        clock: Callable[[], float] = time.perf_counter,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.target_s = target_s
        self.limit = max(self.min_limit, min(max_limit, initial if initial is not None else max_limit))
        self.inflight = 0
        self._window = window
        self._decrease = decrease
        self._increase = increase
        self._clock = clock
        self._on_change = on_change
        self._adaptive = math.isfinite(target_s)  # an infinite target: a static cap, nothing measured
        self._samples: list[float] = []
        self._held_back = False  # the limit refused a request (or was reached) in this window

    def try_acquire(self) -> float | None:
        """A start time to hand back to `release`, or None when the request must be refused."""
        if self.full():
            return None
        self.inflight += 1
        if not self._adaptive:
            return 0.0
        if self.inflight >= self.limit:
            self._held_back = True
        return self._clock()

    def full(self) -> bool:
        """Whether `try_acquire` would refuse now (taking nothing)."""
        if self.inflight >= self.limit:
            self._held_back = True
            return True
        return False

    def release(self, started: float) -> None:
        self.inflight -= 1
        if not self._adaptive:
            return
        self._samples.append(self._clock() - started)
        if len(self._samples) >= self._window:
            self._adjust()

    def _adjust(self) -> None:
        samples = sorted(self._samples)
        p90 = samples[min(len(samples) - 1, math.ceil(0.9 * len(samples)) - 1)]
        limit = self.limit
        if p90 > self.target_s:
            # The further over the target, the harder the cut (down to half per window): a sudden overload
            # converges in a few windows, a slight one is trimmed gently.
            factor = max(0.5, min(self._decrease, self.target_s / p90))
            limit = max(self.min_limit, min(limit - 1, int(limit * factor)))
        elif self._held_back:
            limit = min(self.max_limit, limit + self._increase)
        self._samples.clear()
        self._held_back = False
        if limit != self.limit:
            self.limit = limit
            if self._on_change is not None:
                self._on_change(limit)
