"""Deadline-aware retries (tenacity): exponential backoff with jitter, only on retryable errors,
never sleeping or retrying past the request's deadline."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential

from infermesh import errors
from infermesh.deadline import Deadline

RETRYABLE = (errors.Unavailable, errors.Overloaded)
T = TypeVar("T")


class stop_at_deadline(stop_base):
    """Stop when the next attempt could not start before the deadline."""

    def __init__(self, deadline: Deadline, margin_s: float = 0.0005) -> None:
        self.deadline = deadline
        self.margin_s = margin_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        upcoming = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming + self.margin_s >= self.deadline.at


def retrying(
    deadline: Deadline,
    max_attempts: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop_after_attempt(max_attempts) | stop_at_deadline(deadline),
        wait=wait_random_exponential(multiplier=backoff_initial_s, max=backoff_max_s),
        reraise=True,
    )


async def with_retries(
    call: Callable[[], Awaitable[T]],
    deadline: Deadline,
    max_attempts: int,
    backoff_initial_s: float,
    backoff_max_s: float,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> T:
    """`await call()` until it succeeds, fails with an error not in `retry_on`, or attempts or time run out.

    The first attempt runs outside tenacity, so the common case (success) costs no retry machinery: setting
    up an AsyncRetrying per call was a visible share of the router's CPU. Later attempts back off as
    `retrying` does (exponential, full jitter, never past the deadline)."""
    try:
        return await call()
    except retry_on:
        if max_attempts <= 1 or time.monotonic() + backoff_initial_s >= deadline.at:
            raise
    await asyncio.sleep(random.uniform(0, backoff_initial_s))
    async for attempt in retrying(deadline, max_attempts - 1, 2 * backoff_initial_s, backoff_max_s, retry_on):
        with attempt:
            result = await call()
    return result
