"""Triton's request `priority` and `timeout` parameters (as tritonclient's `infer(priority=, timeout=)` sends them),
pure: which requests leave a queue first, and how long one may wait there.

`priority` 0 (or none) is the default level, 10; a smaller number is served first (Triton: 1 is the highest), a
larger one after the default. `timeout` is in microseconds: a request still queued for a batch after that long is
refused (UNAVAILABLE, as Triton answers "Request timeout expired") instead of being served late.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Protocol, TypeVar

from infermesh.errors import InvalidInput

DEFAULT_PRIORITY = 10
PRIORITY = "priority"
TIMEOUT = "timeout"


def _non_negative_integer(parameters: Mapping[str, object], name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"parameter '{name}' must be a non-negative integer")
    return value


def queue_policy(parameters: Mapping[str, object]) -> tuple[int, float]:
    """(priority, the monotonic time the request may stay queued until: inf without a timeout)."""
    priority = _non_negative_integer(parameters, PRIORITY) or DEFAULT_PRIORITY
    timeout_us = _non_negative_integer(parameters, TIMEOUT)
    until = time.monotonic() + timeout_us / 1e6 if timeout_us else float("inf")
    return priority, until


class Prioritized(Protocol):
    priority: int


Queued = TypeVar("Queued", bound=Prioritized)


def enqueue(queue: deque[Queued], item: Queued) -> None:
    """Behind every queued item of its priority or a higher one (FIFO within a priority). The common case, all at
    the default priority, is one comparison: the last item queued is not of a lower priority."""
    if not queue or queue[-1].priority <= item.priority:
        queue.append(item)
        return
    index = len(queue) - 1
    while index > 0 and queue[index - 1].priority > item.priority:
        index -= 1
    queue.insert(index, item)
