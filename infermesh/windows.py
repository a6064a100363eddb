"""Sliding windows of counts at a constant cost per update (router drift, the gateway's online accuracy)."""

from __future__ import annotations

import numpy as np


class SlidingCounts:
    """Counts (or sums, with a float dtype) per column and bin over the last `window_s` seconds: a ring of `slots`
    slots of window_s / slots; a slot leaving the window is subtracted from the running total, never rescanned."""

    def __init__(
        self, columns: int, bins: int, window_s: float, slots: int, now: float, dtype: type = np.int64
    ) -> None:
        self.slot_s = window_s / slots
        self.slots = slots
        self._ring: np.ndarray = np.zeros((slots, columns, bins), dtype=dtype)
        self.total: np.ndarray = np.zeros((columns, bins), dtype=dtype)
        self._slot = int(now // self.slot_s)

    def add(self, counts: np.ndarray, now: float) -> None:
        self.advance(now)
        self._ring[self._slot % self.slots] += counts
        self.total += counts

    def advance(self, now: float) -> None:
        """Drop the slots that left the window by `now`."""
        slot = int(now // self.slot_s)
        if slot <= self._slot:
            return
        for step in range(1, min(slot - self._slot, self.slots) + 1):
            expired = self._ring[(self._slot + step) % self.slots]
            self.total -= expired
            expired[:] = 0
        self._slot = slot

    @property
    def rows(self) -> int:
        return int(self.total[0].sum()) if len(self.total) else 0
