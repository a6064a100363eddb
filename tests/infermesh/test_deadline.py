"""One deadline per request, built once at a service's edge; and the one registry of status codes."""

from __future__ import annotations

import time

import pytest

from infermesh import errors
from infermesh.deadline import Deadline
from infermesh.method_handlers import call_of


def test_a_client_deadline_is_honoured_even_when_longer_than_the_default() -> None:
    deadline = Deadline.from_remaining(30.0, default_s=10.0)
    assert 29.0 < deadline.remaining() <= 30.0


def test_the_default_applies_only_when_the_client_sent_no_deadline() -> None:
    assert 9.0 < Deadline.from_remaining(None, default_s=10.0).remaining() <= 10.0
    assert Deadline.from_remaining(0.5, default_s=10.0).remaining() <= 0.5


def test_remaining_never_goes_negative_and_expiry_is_told() -> None:
    past = Deadline(time.monotonic() - 1)
    assert past.remaining() == 0.0
    assert past.expired
    assert not Deadline.after(5).expired


def test_a_batch_lives_as_long_as_its_latest_request() -> None:
    early, late = Deadline.after(1), Deadline.after(5)
    assert Deadline.latest([early, late]) is late


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidInput, errors.Code.INVALID_ARGUMENT),
        (errors.NotFound, errors.Code.NOT_FOUND),
        (errors.Unauthenticated, errors.Code.UNAUTHENTICATED),
        (errors.PermissionDenied, errors.Code.PERMISSION_DENIED),
        (errors.Overloaded, errors.Code.RESOURCE_EXHAUSTED),
        (errors.QueueFull, errors.Code.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded, errors.Code.DEADLINE_EXCEEDED),
        (errors.Unavailable, errors.Code.UNAVAILABLE),
        (errors.FailedPrecondition, errors.Code.FAILED_PRECONDITION),
    ],
)
def test_each_error_names_its_status_and_crosses_a_hop_as_itself(error: type[errors.DomainError], code: int) -> None:
    assert error.code == code
    back = errors.error_for(code, "told")
    assert isinstance(back, errors.Overloaded if error is errors.QueueFull else error)
    assert str(back) == "told"


@pytest.mark.parametrize("code", [errors.Code.CANCELLED, errors.Code.UNKNOWN, 99])
def test_a_status_with_no_domain_meaning_is_unavailable(code: int) -> None:
    assert isinstance(errors.error_for(code, "x"), errors.Unavailable)


def test_internal_is_a_failure_on_the_request_not_a_reason_to_retry() -> None:
    failed = errors.error_for(errors.Code.INTERNAL, "x")
    assert isinstance(failed, errors.ModelFailed) and not isinstance(failed, errors.Unavailable)


class Context:
    """The two things the edge reads of a grpc.aio ServicerContext."""

    def __init__(self, remaining: float | None, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> None:
        self._remaining = remaining
        self._metadata = metadata

    def time_remaining(self) -> float | None:
        return self._remaining

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata


def test_each_service_edge_keeps_the_client_s_deadline_and_credentials() -> None:
    call = call_of(Context(60.0, (("x-other", "1"), ("authorization", "Bearer k"))), default_timeout_s=10.0)
    assert 59.0 < call.deadline.remaining() <= 60.0  # not cut to the default
    assert call.authorization == "Bearer k"
    bare = call_of(Context(None), default_timeout_s=10.0)
    assert 9.0 < bare.deadline.remaining() <= 10.0
    assert bare.authorization is None
