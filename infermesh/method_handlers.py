"""The gRPC edge of every service. Each method handler is wrapped once, when it is registered: domain exceptions
become gRPC status codes (the codes the errors name, infermesh.errors), and each call is counted and timed.
`call_of` builds what a core is told of a call (its one Deadline, its credentials).

Anything that is not a DomainError becomes INTERNAL with a generic message; the stack goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from infermesh import errors, metrics
from infermesh.dataplane import Call
from infermesh.deadline import Deadline

log = logging.getLogger(__name__)


def _status_details(error: errors.DomainError) -> tuple[tuple[str, bytes], ...]:
    """Rich status details (google.rpc.Status in `grpc-status-details-bin`) where an error has some to give:
    a retry hint for a refusal that knows when to come back."""
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    delay = Duration()
    delay.FromNanoseconds(max(1, int(retry_after_s * 1e9)))
    detail = AnyMessage()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=error.code, message=errors.client_message(error), details=[detail])
    return ((_STATUS_DETAILS_KEY, status.SerializeToString()),)


_STATUS_DETAILS_KEY = "grpc-status-details-bin"


ANSWERED_BY = "infermesh-answered-by"  # trailing metadata of every refusal a mesh service itself decided


def _refusal(
    error: errors.DomainError, service: str
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """What aborting a call with this error sends: its status, its message, its rich details, and which service
    answered (a caller must not retry what a hop already retried: it only retries a hop it never reached)."""
    return status_for(error), errors.client_message(error), (*_status_details(error), (ANSWERED_BY, service))


def answered_by(error: grpc.aio.AioRpcError) -> str | None:
    """The mesh service that refused the call itself, if one did (else the call failed on its way)."""
    for key, value in error.trailing_metadata() or ():
        if key == ANSWERED_BY:
            return value if isinstance(value, str) else value.decode()
    return None


def status_for(error: errors.DomainError) -> grpc.StatusCode:
    return _STATUS_BY_CODE[error.code]


_STATUS_BY_CODE: dict[errors.Code, grpc.StatusCode] = {errors.Code(code.value[0]): code for code in grpc.StatusCode}


def error_from_rpc(error: grpc.aio.AioRpcError, target: str) -> errors.DomainError:
    """Translate a downstream failure. Details of our own services' errors are client-safe by design; a
    failure of the call itself (CANCELLED, INTERNAL…) says only which hop failed."""
    code = errors.Code(error.code().value[0])
    if code == errors.Code.INTERNAL:  # its details are the hop's generic text: name the hop instead
        return errors.ModelFailed(f"{target} failed on this request")
    translated = errors.error_for(code, error.details() or f"{target}: {code.name}")
    if translated.code != code:  # a status with no domain meaning: its details are not ours to pass on
        return errors.Unavailable(
            f"{target} call was cancelled" if code == errors.Code.CANCELLED else f"{target} failed"
        )
    return translated


TENANT_METADATA = "infermesh-tenant"  # the gateway's authenticated tenant, on its calls to the router


def _credentials(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str | None, str]:
    """The `authorization` metadata and the internal tenant metadata (one pass over the call's metadata)."""
    authorization, tenant = None, ""
    for key, value in metadata or ():
        if key == "authorization":
            authorization = value if isinstance(value, str) else value.decode(errors="replace")
        elif key == TENANT_METADATA:
            tenant = value if isinstance(value, str) else value.decode(errors="replace")
    return authorization, tenant


def deadline_of(context: grpc.aio.ServicerContext, default_timeout_s: float) -> Deadline:
    """The call's deadline: the client's, however long, else `default_timeout_s` from now."""
    return Deadline.from_remaining(context.time_remaining(), default_timeout_s)


def call_of(context: grpc.aio.ServicerContext, default_timeout_s: float) -> Call:
    """What a core is told of the call it serves: its deadline and the credentials. The one place a service's
    edge builds them."""
    authorization, tenant = _credentials(context.invocation_metadata())
    return Call(deadline_of(context, default_timeout_s), authorization, tenant=tenant)


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# Decides from a call's method and `authorization` metadata alone, as the call starts: the refusal to answer at
# once, or None.
Gate = Callable[[str, str | None], errors.DomainError | None]


class ServiceHandlers:
    """Maps DomainError → status, counts requests by code and times them, by wrapping each method handler
    once, when it is registered (`registrar`). A grpc.aio server interceptor did the same per call and cost
    ~10 % of a trivial call's throughput here (docs/performance.md); health and reflection stay unwrapped."""

    def __init__(self, service: str, gated: bool = False) -> None:
        self._service = service
        self.counters = metrics.RequestCounters(service)
        # With `gated`, every call is looked up through the generic handlers (none is registered by name), so
        # `gate` (set once the service has what it decides with) sees each call as it starts, before gRPC reads
        # a message of it: a unary call otherwise reaches Python only with its body.
        self.gated = gated
        self.gate: Gate | None = None
        # Every wrapped handler by its full method name, and the wrapped generic handlers: what a call that
        # arrives as a hop-stream message runs (infermesh.hop_streams).
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[_WrappedGenericHandler] = []

    def lookup(self, method: str) -> grpc.RpcMethodHandler | None:
        """The wrapped handler of `method` (its full name), as a call of it would run; None: no such method."""
        handler = self._methods.get(method)
        if handler is None:
            for generic in self._generic:
                handler = generic.service(_MethodOnly(method))
                if handler is not None:
                    break
        return handler

    def refusing(self, method: str, handler: grpc.RpcMethodHandler, error: errors.DomainError) -> grpc.RpcMethodHandler:
        """A handler that ends the call with `error` as it starts. Request-streaming whatever the method, so that
        gRPC runs it without waiting for a message (a unary method's body may never come); counted as the
        method's request."""
        code, message, trailers = _refusal(error, self._service)
        self.counters.record(method.rsplit("/", 1)[-1], "", "", code.name, 0.0)

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(code, message, trailers)

        async def refuse_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message, trailers)
            yield  # never reached: what makes this an async generator, as a streaming handler is

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.stream_unary_rpc_method_handler(refuse)

    def registrar(self, server: grpc.aio.Server) -> _WrappingRegistrar:
        """What a service registers its servicers on: the server, with every handler added wrapped."""
        return _WrappingRegistrar(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None or method.startswith("/grpc."):
            return handler
        short_name = method.rsplit("/", 1)[-1]
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, short_name),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:  # a unary method read by its handler (first_message)
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, short_name),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, short_name),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, behavior: Behavior, method: str) -> Behavior:
        counters = self.counters
        inflight = counters.inflight

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            labels = metrics.RequestLabels()
            metrics.request_labels.set(labels)
            start = time.perf_counter()
            code = "OK"
            inflight.inc()
            try:
                try:
                    if request is MALFORMED:
                        raise errors.InvalidInput("malformed request: the message could not be parsed")
                    return await behavior(request, context)
                except errors.DomainError as error:
                    # Only what the answer needs leaves this block, and the request is let go before aborting:
                    # gRPC keeps the abort exception on the call, and its traceback holds this frame, so
                    # anything this frame or the error's traceback still referenced (the request's megabytes)
                    # would stay alive in a reference cycle until a full garbage collection. Measured: 1 GB
                    # after 40 refusals of a 16 MiB request.
                    refusal = _refusal(error, self._service)
                del request
                code = refusal[0].name
                await context.abort(*refusal)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error in %s", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                inflight.dec()
                counters.record(method, labels.model, labels.version, code, time.perf_counter() - start)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            labels = metrics.RequestLabels()
            metrics.request_labels.set(labels)
            # Each message is a request: counted, timed and in flight like a unary call (StreamMessages).
            stream_messages.set(StreamMessages(self, method, labels))
            try:
                try:
                    async for response in behavior(_checked(request_iterator), context):
                        yield response
                    return
                except errors.DomainError as error:
                    refusal = _refusal(error, self._service)  # aborted outside this block: see the unary wrapper
                await context.abort(*refusal)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("unhandled error in stream")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")

        return wrapped


class BodyWaits:
    """Calls of a few methods that answer without credentials, waiting for their (tiny) request: at most
    `limit` at once, each for at most `timeout_s`. Such a call holds a gRPC call slot while it waits, and gRPC
    itself would wait for a body for as long as its sender likes."""

    def __init__(self, limit: int = 32, timeout_s: float = 2.0) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self.waiting = 0


def first_message(behavior: Behavior, waits: BodyWaits) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """A unary method's behavior as a request-streaming handler: it runs as the call starts and reads the one
    request itself, within `waits`' bounds (RESOURCE_EXHAUSTED past the number, DEADLINE_EXCEEDED past the time),
    so a call whose body never comes holds its slot briefly instead of for as long as its sender likes."""

    async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal: errors.DomainError | None = None
        request: Any = None
        if waits.waiting >= waits.limit:
            refusal = errors.Overloaded("too many calls are waiting to send their request; try again")
        else:
            waits.waiting += 1
            try:
                async with asyncio.timeout(waits.timeout_s):
                    request = await context.read()
            except TimeoutError:
                refusal = errors.DeadlineExceeded("the request message did not arrive in time")
            finally:
                waits.waiting -= 1
            if refusal is None and (request is grpc.aio.EOF or request is MALFORMED):
                refusal = errors.InvalidInput("malformed request: the message could not be parsed")
        if refusal is not None:  # answered here: the handler may be registered unwrapped (grpc.health.v1)
            await context.abort(status_for(refusal), errors.client_message(refusal))
        return await behavior(request, context)

    return handle


def bounded_health(health: Any, waits: BodyWaits) -> grpc.GenericRpcHandler:
    """grpc.health.v1 for an API port: each call reads its request within `waits`, as the open methods do (a
    health check's body can be withheld like any unary call's). A service's own health port serves it plain:
    that server has no call limit to exhaust."""
    request = _tolerant(health_pb2.HealthCheckRequest.FromString)
    response = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(
            first_message(health.Check, waits), request_deserializer=request, response_serializer=response
        ),
        "Watch": grpc.stream_stream_rpc_method_handler(
            first_message(health.Watch, waits), request_deserializer=request, response_serializer=response
        ),
    }
    return grpc.method_handlers_generic_handler(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, handlers)


class StreamMessages:
    """Counts the messages of one stream as requests: `begin()` when one arrives, `end(started, code)` when it
    is answered (in order). The stream's servicer calls them; the handler wrapper sets one up per stream."""

    __slots__ = ("_handlers", "_labels", "_method")

    def __init__(self, handlers: ServiceHandlers, method: str, labels: metrics.RequestLabels) -> None:
        self._handlers = handlers
        self._method = method
        self._labels = labels

    def begin(self) -> float:
        self._handlers.counters.inflight.inc()
        self._labels.model = self._labels.version = ""  # set again by the core for this message's model
        return time.perf_counter()

    def end(self, started: float, code: str) -> None:
        counters = self._handlers.counters
        counters.inflight.dec()
        counters.record(self._method, self._labels.model, self._labels.version, code, time.perf_counter() - started)


stream_messages: ContextVar[StreamMessages | None] = ContextVar("infermesh_stream_messages", default=None)


class _WrappedGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, inner: grpc.GenericRpcHandler, handlers: ServiceHandlers) -> None:
        self._inner = inner
        self._handlers = handlers
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._handlers.wrap(method, self._inner.service(handler_call_details))
            if wrapped is None:
                return None
            self._wrapped[method] = wrapped  # only methods that exist: clients choose the names
        gate = self._handlers.gate
        if gate is not None:
            refusal = gate(method, _credentials(handler_call_details.invocation_metadata)[0])
            if refusal is not None:
                return self._handlers.refusing(method, wrapped, refusal)
        return wrapped


class _WrappingRegistrar:
    """Stands in for the server while servicers register: handlers go to the server wrapped."""

    def __init__(self, server: grpc.aio.Server, handlers: ServiceHandlers) -> None:
        self._server = server
        self._handlers = handlers

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        wrapped = tuple(_WrappedGenericHandler(handler, self._handlers) for handler in generic_handlers)
        self._handlers._generic.extend(wrapped)
        self._server.add_generic_rpc_handlers(wrapped)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        wrapped = {name: self._handlers.wrap(f"/{service_name}/{name}", h) for name, h in method_handlers.items()}
        self._handlers._methods.update({f"/{service_name}/{name}": h for name, h in wrapped.items() if h is not None})
        if self._handlers.gated:
            return  # the generated code adds the same methods as a generic handler too: calls take that way
        self._server.add_registered_method_handlers(service_name, wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _MethodOnly:
    """The HandlerCallDetails a generic handler is asked with when a hop-stream message names a method."""

    __slots__ = ("invocation_metadata", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Malformed:
    """Stands in for a request whose bytes did not parse (the handler answers INVALID_ARGUMENT)."""


MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises: grpc would answer UNKNOWN with the exception's text."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return MALFORMED

    return deserialize


async def _checked(request_iterator: Any) -> Any:
    async for request in request_iterator:
        if request is MALFORMED:
            raise errors.InvalidInput("malformed request: a message could not be parsed")
        yield request


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN"
