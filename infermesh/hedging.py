"""When to send a second copy of a slow call (hedged requests, as in "The Tail at Scale"), pure logic.

A call that has not answered by the p95 of recent calls is probably stuck behind something (a slow replica, a
long batch); a copy on another replica usually answers first. Hedges are bounded to `max_ratio` of the calls by a
token bucket (each call earns `max_ratio` of a token, a hedge spends one), so a slow fleet is not sent twice the
load. Until enough calls were seen, or with a single replica, nothing is hedged.
"""

from __future__ import annotations

import math
from collections import deque


class HedgePolicy:
    def __init__(
        self,
        max_ratio: float = 0.05,
        percentile: float = 0.95,
        window: int = 256,
        min_samples: int = 64,
        min_delay_s: float = 0.001,
        max_tokens: float = 10.0,
    ) -> None:
        self.max_ratio = max_ratio
        self.percentile = percentile
        self.min_samples = min_samples
        self.min_delay_s = min_delay_s
        self.max_tokens = max_tokens
        self.tokens = 0.0
        self._latencies: deque[float] = deque(maxlen=window)
        self._since_estimate = 0
        self._delay_s: float | None = None

    def observe(self, latency_s: float) -> None:
        """A call's latency (every call that answered, hedged or not)."""
        self._latencies.append(latency_s)
        self._since_estimate += 1
        if self._since_estimate >= 32 and len(self._latencies) >= self.min_samples:
            ordered = sorted(self._latencies)
            index = min(len(ordered) - 1, math.ceil(self.percentile * len(ordered)) - 1)
            self._delay_s = max(self.min_delay_s, ordered[index])
            self._since_estimate = 0

    def delay(self) -> float | None:
        """How long a call may take before a hedge goes out (None: no hedge for this call). Each call earns the
        bucket its share of a hedge."""
        if self.max_ratio <= 0:
            return None
        self.tokens = min(self.max_tokens, self.tokens + self.max_ratio)
        return self._delay_s

    def spend(self) -> bool:
        """Whether a hedge may go now (and take its token)."""
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
