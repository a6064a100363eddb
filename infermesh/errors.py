"""Domain exceptions shared by every service. They know nothing of gRPC: `interceptors.ServiceHandlers` maps them.

The message of a domain error is meant for the client; it must never carry internal detail
(stack traces, addresses, feature values). Anything that is not a DomainError reaches the client
as INTERNAL with a generic message.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of all errors whose message is safe to show to the client."""


class InvalidInput(DomainError):
    """Malformed request: names the tensor and the problem."""


class NotFound(DomainError):
    """Unknown model, version or feature view."""


class Unauthenticated(DomainError):
    """Missing or unknown credentials."""


class PermissionDenied(DomainError):
    """Known caller, not allowed to use this resource."""


class Overloaded(DomainError):
    """Admission refused at once: a bounded queue or in-flight limit is full. Retry elsewhere or later."""


class QueueFull(Overloaded):
    """A model's batching queue is full (documented status: RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(DomainError):
    """The request's deadline passed before it could be served."""


class Unavailable(DomainError):
    """A dependency (replica, feature store) cannot be reached right now; safe to retry."""


class FailedPrecondition(DomainError):
    """The request is valid but the system is not in a state to serve it (e.g. model not ready)."""
