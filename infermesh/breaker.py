"""A circuit breaker for a dependency (pure logic): after `failure_threshold` consecutive failures (errors or
timeouts) it opens, and calls are refused at once instead of waiting on a dependency that is not answering. After
`open_s` one call at a time is let through as a probe (half-open): a success closes the breaker, a failure opens it
again for another `open_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go to the dependency now. In half-open state only one probe is out at a time; the
        caller must report its outcome (`success` or `failure`)."""
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.OPEN:
            if self._clock() - self._opened_at < self.open_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def release(self) -> None:
        """A call that ended for a reason that says nothing of the dependency (cancelled, refused as invalid): a
        probe it was no longer holds the half-open slot."""
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)
