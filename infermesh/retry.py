"""Deadline-aware retries (tenacity): exponential backoff with jitter, only on retryable errors, never sleeping or
retrying past the request's deadline, and within a retry budget per downstream (gRPC's retry throttling, A6), so
that retries cannot multiply the load on a dependency that is already failing."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential

from infermesh import errors, metrics
from infermesh.deadline import Deadline

RETRYABLE = (errors.Unavailable, errors.Overloaded)
T = TypeVar("T")


class RetryBudget:
    """gRPC's retry throttling (A6) for one downstream: a bucket of `max_tokens`; each failed attempt takes one,
    each success gives back `token_ratio`; retries are allowed only while more than half the bucket is left. So
    while the downstream keeps failing, retries stop after a few, and in steady state they stay within about
    `token_ratio` of the successful calls."""

    def __init__(self, target: str, max_tokens: float = 20.0, token_ratio: float = 0.1) -> None:
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens
        self._throttled = metrics.RETRIES_THROTTLED.labels(target)

    def succeeded(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def failed(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def allows_retry(self) -> bool:
        if self.tokens > self.max_tokens / 2:
            return True
        self._throttled.inc()
        return False


class _budget_allows(retry_base):
    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.budget.allows_retry()


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
    budget: RetryBudget | None = None,
) -> AsyncRetrying:
    retry = retry_if_exception_type(retry_on)
    return AsyncRetrying(
        retry=retry & _budget_allows(budget) if budget is not None else retry,
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
    budget: RetryBudget | None = None,
) -> T:
    """`await call()` until it succeeds, fails with an error not in `retry_on`, or attempts, time or the
    downstream's retry `budget` run out.

    The first attempt runs outside tenacity, so the common case (success) costs no retry machinery: setting
    up an AsyncRetrying per call was a visible share of the router's CPU. Later attempts back off as
    `retrying` does (exponential, full jitter, never past the deadline)."""
    try:
        result = await call()
    except retry_on:
        if budget is not None:
            budget.failed()
        if max_attempts <= 1 or time.monotonic() + backoff_initial_s >= deadline.at:
            raise
        if budget is not None and not budget.allows_retry():
            raise
    else:
        if budget is not None:
            budget.succeeded()
        return result
    await asyncio.sleep(random.uniform(0, backoff_initial_s))

    async def counted() -> T:
        try:
            answer = await call()
        except retry_on:
            if budget is not None:
                budget.failed()
            raise
        if budget is not None:
            budget.succeeded()
        return answer

    retries = retrying(deadline, max_attempts - 1, 2 * backoff_initial_s, backoff_max_s, retry_on, budget)
    async for attempt in retries:
        with attempt:
            result = await counted()
    return result
