"""Domain exceptions shared by every service, and the one registry of their status codes.

They know nothing of gRPC: each class names its canonical status code (`Code`, the numbers of google.rpc.Code,
which gRPC uses as they are); `infermesh.method_handlers` turns that into a gRPC status, and the internal
batch RPC carries it per segment. The message of a domain error is meant for the client; it must never carry
internal detail (stack traces, addresses, feature values). Anything that is not a DomainError reaches the
client as INTERNAL with a generic message.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class Code(IntEnum):
    """Canonical status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class DomainError(Exception):
    """Base of all errors whose message is safe to show to the client."""

    code: ClassVar[Code] = Code.INTERNAL


# A status message travels in a header, and clients refuse large headers (gRPC's default limit is 8 KiB): a
# message quoting what the client sent (a 10 KB model name in a NOT_FOUND) would reach it as RESOURCE_EXHAUSTED.
MAX_CLIENT_MESSAGE_CHARS = 1024


def client_message(error: DomainError) -> str:
    """The error's message as the client gets it: cut to a size every client accepts."""
    message = str(error)
    if len(message) <= MAX_CLIENT_MESSAGE_CHARS:
        return message
    return message[: MAX_CLIENT_MESSAGE_CHARS - 3] + "..."


class InvalidInput(DomainError):
    """Malformed request: names the tensor and the problem."""

    code = Code.INVALID_ARGUMENT


class NotFound(DomainError):
    """Unknown model, version, entity or feature view."""

    code = Code.NOT_FOUND


class Unauthenticated(DomainError):
    """Missing or unknown credentials."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(DomainError):
    """Known caller, not allowed to use this resource."""

    code = Code.PERMISSION_DENIED


class Overloaded(DomainError):
    """Admission refused at once: a bounded queue, an in-flight limit or a rate is used up. Retry elsewhere or
    later; `retry_after_s`, when known, travels to the client as a retry hint (google.rpc.RetryInfo)."""

    code = Code.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    """A model's batching queue is full (documented status: RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(DomainError):
    """The request's deadline passed before it could be served."""

    code = Code.DEADLINE_EXCEEDED


class Unavailable(DomainError):
    """A dependency (replica, feature store) cannot be reached right now; safe to retry."""

    code = Code.UNAVAILABLE


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state to serve it (e.g. model not ready)."""

    code = Code.FAILED_PRECONDITION


class ModelFailed(DomainError):
    """A hop below failed on this request itself (a model's forward pass raised on its rows): not the replica's
    fault, so neither retried elsewhere nor held against the replica; a traffic split answers it from the
    baseline. Its message only says which hop failed."""

    code = Code.INTERNAL


# And back: the error a status code stands for, when a downstream hop answers with it.
_ERROR_BY_CODE: dict[Code, type[DomainError]] = {
    cls.code: cls
    for cls in (
        InvalidInput,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        Overloaded,
        DeadlineExceeded,
        Unavailable,
        FailedPrecondition,
        ModelFailed,
    )
}


def error_for(code: int, message: str) -> DomainError:
    """The domain error a downstream status stands for. INTERNAL is ModelFailed (the hop failed on this request);
    codes with no domain meaning here (CANCELLED, UNKNOWN…) become Unavailable: the hop below failed, and a retry
    elsewhere may succeed."""
    try:
        error_type = _ERROR_BY_CODE.get(Code(code), Unavailable)
    except ValueError:
        error_type = Unavailable
    return error_type(message)
