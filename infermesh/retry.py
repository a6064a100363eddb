"""Deadline-aware retries (tenacity): exponential backoff with jitter, only on retryable errors,
never sleeping or retrying past the request's deadline."""

from __future__ import annotations

import time

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from infermesh import errors

RETRYABLE = (errors.Unavailable, errors.Overloaded)


class stop_at_deadline:
    """Stop when the next attempt could not start before the deadline (monotonic seconds)."""

    def __init__(self, deadline: float, margin_s: float = 0.0005) -> None:
        self.deadline = deadline
        self.margin_s = margin_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        upcoming = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming + self.margin_s >= self.deadline


def retrying(
    deadline: float,
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
