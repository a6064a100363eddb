"""One deadline per request: an absolute time on `time.monotonic()`, built once at each service's edge
and passed to every core, client, retry, coalescer and batcher below it."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deadline:
    at: float  # time.monotonic() seconds

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_remaining(cls, remaining_s: float | None, default_s: float) -> Deadline:
        """The client's deadline when it sent one, however long; `default_s` from now only when it sent none."""
        return cls(time.monotonic() + (default_s if remaining_s is None else remaining_s))

    @staticmethod
    def latest(deadlines: list[Deadline]) -> Deadline:
        """The deadline of a batch serving several requests: the last of theirs."""
        return max(deadlines, key=lambda deadline: deadline.at)

    def within(self, seconds: float) -> Deadline:
        """This deadline, or `seconds` from now if that is sooner: a budget for one dependency's call."""
        return Deadline(min(self.at, time.monotonic() + seconds))

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at
