"""Deadline-aware retries: first attempt straight, then backoff under tenacity."""

from __future__ import annotations

import pytest

from infermesh import errors
from infermesh.deadline import Deadline
from infermesh.retry import RetryBudget, with_retries


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


def test_the_budget_allows_retries_while_more_than_half_its_tokens_are_left() -> None:
    budget = RetryBudget("test", max_tokens=4, token_ratio=0.5)
    budget.failed()
    assert budget.allows_retry()  # 3 > 2
    budget.failed()
    assert not budget.allows_retry()  # 2: half spent
    budget.succeeded()
    assert budget.allows_retry()  # 2.5
    for _ in range(10):
        budget.succeeded()
    assert budget.tokens == 4  # never past the bucket


async def test_a_downstream_that_keeps_failing_gets_a_few_retries_not_a_multiple_of_the_calls() -> None:
    budget = RetryBudget("test", max_tokens=10, token_ratio=0.1)
    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        raise errors.Unavailable("down")

    for _ in range(50):
        with pytest.raises(errors.Unavailable):
            await with_retries(down, far(), 3, 0.0001, 0.001, budget=budget)
    # Without the budget: 150 calls (3 attempts each). With it: a few retries, then first attempts only.
    assert 50 < calls <= 50 + 6


async def test_successes_earn_retries_back() -> None:
    budget = RetryBudget("test", max_tokens=10, token_ratio=0.1)
    for _ in range(10):
        budget.failed()
    assert not budget.allows_retry()
    for _ in range(70):  # 7 tokens back: more than half the bucket
        assert await with_retries(Flaky([]), far(), 3, 0.0001, 0.001, budget=budget) == "ok"
    call = Flaky([errors.Unavailable("blip")])
    assert await with_retries(call, far(), 3, 0.0001, 0.001, budget=budget) == "ok" and call.calls == 2
