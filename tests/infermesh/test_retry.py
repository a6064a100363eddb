"""Deadline-aware retries: first attempt straight, then backoff under tenacity."""

from __future__ import annotations

import pytest

from infermesh import errors
from infermesh.deadline import Deadline
from infermesh.retry import with_retries


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def far() -> Deadline:
    return Deadline.after(10)


async def test_success_first_time_is_one_call() -> None:
    call = Flaky([])
    assert await with_retries(call, far(), 3, 0.001, 0.01) == "ok"
    assert call.calls == 1


async def test_retryable_errors_are_retried_up_to_max_attempts() -> None:
    call = Flaky([errors.Unavailable("a"), errors.Overloaded("b")])
    assert await with_retries(call, far(), 3, 0.001, 0.01) == "ok"
    assert call.calls == 3
    call = Flaky([errors.Unavailable("a")] * 3)
    with pytest.raises(errors.Unavailable):
        await with_retries(call, far(), 3, 0.001, 0.01)
    assert call.calls == 3


async def test_other_errors_are_not_retried() -> None:
    call = Flaky([errors.InvalidInput("bad")])
    with pytest.raises(errors.InvalidInput):
        await with_retries(call, far(), 3, 0.001, 0.01)
    assert call.calls == 1


async def test_no_retry_past_the_deadline() -> None:
    call = Flaky([errors.Unavailable("a")] * 5)
    with pytest.raises(errors.Unavailable):
        await with_retries(call, Deadline.after(0.0005), 5, 0.002, 0.01)
    assert call.calls == 1


async def test_retry_on_narrows_what_is_retried() -> None:
    call = Flaky([errors.Overloaded("busy")])
    with pytest.raises(errors.Overloaded):
        await with_retries(call, far(), 3, 0.001, 0.01, retry_on=(errors.Unavailable,))
    assert call.calls == 1
