"""OpenTelemetry set-up: off unless the standard OTEL_* variables configure an exporter.

When on, every server and client call carries a span and W3C `traceparent` travels in gRPC metadata.
When off, no interceptor is installed at all, so the hot path pays nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue as AttributeValue  # re-exported: span attribute values

_enabled = False
_provider = None
tracer = trace.get_tracer("infermesh")


def tracing_requested() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(service_name: str) -> bool:
    """Install a tracer provider exporting per OTEL_*; returns whether tracing is on."""
    global _enabled, _provider
    if _enabled or not tracing_requested():
        return _enabled
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    exporter: SpanExporter
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    _enabled = True
    return True


def tracing_enabled() -> bool:
    return _enabled


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def server_interceptors() -> list[Any]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    inner = aio_server_interceptor()  # type: ignore[no-untyped-call]  # the instrumentation is unannotated
    return [_UnlessHopStream(inner)]


HOP_STREAM_EXCHANGE = "/infermesh.hop.v1.HopStream/Exchange"


class _UnlessHopStream(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """The instrumentation's server spans, except for hop streams: a stream lives for many requests, and each of
    its messages gets a server span of its own in its caller's trace (infermesh.hop_streams)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        if handler_call_details.method == HOP_STREAM_EXCHANGE:
            return await continuation(handler_call_details)
        return await self._inner.intercept_service(continuation, handler_call_details)


def client_interceptors() -> list[Any]:
    if not _enabled:
        return []
    return [TracingClientInterceptor()]


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Client span per unary call, `traceparent` injected into the metadata.

    Ours rather than opentelemetry-instrumentation-grpc's aio client interceptor, which leaves the span
    open when the call is cancelled (upstream issue #3271): here the span is a context manager around
    the awaited call, so it ends on success, on error, on deadline and on cancellation alike.
    """

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        service, _, rpc = name.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes) as current:
            metadata = list(client_call_details.metadata or ())
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata.extend(carrier.items())
            details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                grpc.aio.Metadata(*metadata),
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
            try:
                call = await continuation(details, request)
                response = await call
            except grpc.aio.AioRpcError as error:
                current.set_attribute("rpc.grpc.status_code", error.code().value[0])
                current.set_status(Status(StatusCode.ERROR, error.code().name))
                raise
            except asyncio.CancelledError:
                current.set_status(Status(StatusCode.ERROR, "CANCELLED"))
                raise
            current.set_attribute("rpc.grpc.status_code", 0)
            return response


@contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[None]:
    """A server span for a call that arrived outside gRPC (the gateway's HTTP front), in the trace its W3C
    `traceparent` header names, else a new one."""
    if not _enabled:
        yield
        return
    with tracer.start_as_current_span(name, context=propagate.extract(headers), kind=trace.SpanKind.SERVER):
        yield


@contextmanager
def span(name: str, **attributes: AttributeValue) -> Iterator[trace.Span]:
    """A span that always ends, also on cancellation (BaseException)."""
    if not _enabled:
        yield trace.INVALID_SPAN
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def record_span(name: str, start_ns: int, end_ns: int, **attributes: AttributeValue) -> None:
    """Record an already-finished interval (e.g. time spent in a batch queue) as a child span."""
    if not _enabled:
        return
    recorded = tracer.start_span(name, start_time=start_ns, attributes=attributes)
    recorded.end(end_time=end_ns)


# Requests that share a batch ---------------------------------------------------------------------------


def current_context() -> otel_context.Context | None:
    """The calling request's trace context, to hand to the batch that will carry it (None: tracing is off)."""
    return otel_context.get_current() if _enabled else None


def trace_id_of(context: otel_context.Context | None) -> str:
    """The trace id (32 hex digits) of a request's trace context; "" when it is not traced."""
    if context is None:
        return ""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


class Traced(Protocol):
    """A request waiting for a batch: its trace context, and when it queued (time.time_ns(); 0: it did not)."""

    trace_context: otel_context.Context | None
    queued_at_ns: int


@contextmanager
def batch_context(name: str, requests: Sequence[Traced]) -> Iterator[None]:
    """Run a batch of requests under the right trace.

    A batch serving one request (or several from one trace, e.g. a gateway batch's segments) runs in that
    trace. A batch serving several requests gets a span of its own in a trace of its own, linked to each of
    them; each request gets a wait span in its own trace, linked to the batch. So no span of one request ever
    lands in another request's trace, and every request's trace still leads to the work that served it."""
    if not _enabled:
        yield
        return
    parents: dict[int, otel_context.Context] = {}
    for request in requests:
        if request.trace_context is not None:
            span_id = trace.get_current_span(request.trace_context).get_span_context().span_id
            parents.setdefault(span_id, request.trace_context)
    if len(parents) <= 1:
        context = next(iter(parents.values()), None)
        token = otel_context.attach(context) if context is not None else None
        try:
            _record_waits(name, requests, None)
            yield
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    links = [trace.Link(trace.get_current_span(c).get_span_context()) for c in parents.values()]
    batch = tracer.start_span(f"{name}.batch", context=otel_context.Context(), links=links)
    batch.set_attribute("requests", len(requests))
    _record_waits(name, requests, batch.get_span_context())
    with trace.use_span(batch, end_on_exit=True):  # ends it, also on error or cancellation
        yield


def _record_waits(name: str, requests: Sequence[Traced], batch: trace.SpanContext | None) -> None:
    now = time.time_ns()
    links = [trace.Link(batch)] if batch is not None else None
    for request in requests:
        if request.trace_context is not None and request.queued_at_ns:
            wait = tracer.start_span(
                f"{name}.batch_wait", context=request.trace_context, start_time=request.queued_at_ns, links=links
            )
            wait.end(end_time=now)
