"""Hop streams: the mesh's internal unary calls as messages on a few long-lived bidirectional streams per peer
(`protos/hop_stream.proto`). On this machine a message round trip on an open stream costs about a quarter less than
a unary grpc.aio call, whose per-call set-up and thread wake-ups dominate a small request (scenario 0 of
`make bench`: 0.35-0.40 ms against 0.47-0.55 ms for one hop).

Caller side, `HopStreams` (one per channel) hands out `StreamedMethod`s that stand in for
`channel.unary_unary(...)`: same request and response bytes, same metadata, same `grpc.aio.AioRpcError` on
failure (code, details, trailing metadata: `infermesh-answered-by` included), so every client, retry, hedge and
ejection above works unchanged. Server side, `HopStreamEndpoint` runs each message through the server's own
wrapped unary handler (status mapping, metrics, deadlines, credentials) as if it had arrived as a call.

Failure and bounds:
- A broken stream (peer killed, connection lost) fails only its calls in flight, as UNAVAILABLE with no
  `infermesh-answered-by`: the one kind of failure callers send again, within their deadlines, elsewhere.
- A caller puts at most `calls_per_stream` calls on one stream, and with `only_when_idle` only a call made while
  no other call of the process is in flight: otherwise the call goes as a plain unary call, which costs less under
  load (docs/performance.md). A server refuses past its own bound (RESOURCE_EXHAUSTED): no buffer grows.
- A call's deadline travels with it and is kept by the caller: at the deadline (or when the caller is cancelled)
  the call fails at once and a cancel message stops its work on the server.
- A draining server answers new messages UNAVAILABLE (unanswered: sent again elsewhere) and closes each stream
  once its calls are answered; callers then open a fresh stream (or fail over) on their next call.
- Streams retire after `max_age_s`, so connections rebalance as they do for unary calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from infermesh import telemetry
from infermesh.proto import hop_stream_pb2

log = logging.getLogger(__name__)

EXCHANGE = telemetry.HOP_STREAM_EXCHANGE
SERVICE = hop_stream_pb2.DESCRIPTOR.services_by_name["HopStream"].full_name

Frame = hop_stream_pb2.Frame
Metadata = Sequence[tuple[str, str | bytes]]


def _broken(details: str) -> grpc.aio.AioRpcError:
    """The failure of a call whose stream broke before its answer came: never answered, so callers may retry."""
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _trailers(frame: Any) -> grpc.aio.Metadata:
    return grpc.aio.Metadata(
        *(
            (key, value if key.endswith("-bin") else value.decode(errors="replace"))
            for key, value in frame.trailers.items()
        )
    )


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class _Stream:
    """One open Exchange call: the calls in flight on it by id. One writer task sends its frames in order, so a
    caller cancelled (or timed out) never interrupts a write half-way: that would break the stream for all."""

    def __init__(self, open_call: Callable[[], Any], max_age_s: float) -> None:
        self.call = open_call()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.broken = False
        self.retire_at = time.monotonic() + max_age_s
        # Bounded in effect: one request frame per pending call (at most calls_per_stream) plus their cancels.
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    @property
    def open(self) -> bool:
        return not self.broken and time.monotonic() < self.retire_at

    async def _read(self) -> None:
        details = "hop stream closed"
        try:
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF:
                    break
                waiter = self.pending.pop(frame.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        except grpc.aio.AioRpcError as error:
            details = f"hop stream broke: {error.code().name}"
        except asyncio.CancelledError:
            details = "hop stream closed"
        finally:
            self._fail_all(details)

    async def _write(self) -> None:
        try:
            while True:
                frame = await self._outbox.get()
                if frame is None:  # retired and idle: tell the server we are done
                    await self.call.done_writing()
                    return
                await self.call.write(frame)
        except asyncio.CancelledError:
            pass
        except Exception as error:  # the call ended (peer gone, cancelled): every call on it has failed
            self._fail_all(f"hop stream broke: {type(error).__name__}")

    def _fail_all(self, details: str) -> None:
        self.broken = True
        failure = _broken(details)
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
        self.pending.clear()

    def send(self, frame: Any) -> None:
        self._outbox.put_nowait(frame)

    def cancel(self, call_id: int) -> None:
        """Tell the server the caller gave up on `call_id` (best effort: the stream may be gone)."""
        if not self.broken:
            self._outbox.put_nowait(Frame(id=call_id, cancel=True))

    def maybe_finish(self) -> None:
        """A retired stream with nothing in flight is closed (its reader then ends)."""
        if not self.pending and not self.broken and time.monotonic() >= self.retire_at:
            self.broken = True
            self._outbox.put_nowait(None)

    def close(self) -> None:
        self.broken = True
        self.call.cancel()
        self._writer.cancel()


class HopStreams:
    """The streams to one peer (a channel): up to `count` of them, opened when first needed and again after
    one breaks or retires. A call takes the stream with the fewest calls in flight. With `only_when_idle`, a call takes
    a stream only when no other call through hop streams of this process (to any peer) is in flight, and goes as a
    unary call otherwise: a stream saves a unary call's set-up at low load, while under load
    unary calls share gRPC core's batched writes and wake-ups and cost less (docs/performance.md)."""

    # Calls in flight through any HopStreams of this process (one event loop), on streams or not.
    process_calls = 0

    def __init__(
        self,
        channel: grpc.aio.Channel,
        count: int,
        calls_per_stream: int = 256,
        only_when_idle: bool = False,
        max_age_s: float = 300.0,
    ) -> None:
        if count < 1:
            raise ValueError("a HopStreams needs at least one stream")
        self._channel = channel
        self._exchange = channel.stream_stream(
            EXCHANGE, request_serializer=Frame.SerializeToString, response_deserializer=Frame.FromString
        )
        self._streams: list[_Stream | None] = [None] * count
        self._calls_per_stream = calls_per_stream
        self._max_age_s = max_age_s
        self._ids = itertools.count(1)
        self._only_when_idle = only_when_idle

    def begin(self) -> bool:
        """A call starts (end() must follow): whether it should go on a stream."""
        idle = not HopStreams.process_calls
        HopStreams.process_calls += 1
        return idle or not self._only_when_idle

    def end(self) -> None:
        HopStreams.process_calls -= 1

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> StreamedMethod:
        """What `channel.unary_unary(method, ...)` would give, carried on these streams."""
        fallback = self._channel.unary_unary(
            method, request_serializer=request_serializer, response_deserializer=response_deserializer
        )
        return StreamedMethod(self, method, request_serializer, response_deserializer, fallback)

    def _stream(self) -> _Stream | None:
        """The open stream with the fewest calls in flight (opening one in a free slot); None: all are full."""
        best: _Stream | None = None
        for slot, stream in enumerate(self._streams):
            if stream is None or not stream.open:
                if stream is not None:
                    stream.maybe_finish()
                stream = _Stream(self._exchange, self._max_age_s)
                self._streams[slot] = stream
            calls = len(stream.pending)
            if calls < self._calls_per_stream and (best is None or calls < len(best.pending)):
                best = stream
                if not calls:
                    break
        return best

    async def call(self, method: str, payload: bytes, timeout_s: float | None, metadata: Metadata | None) -> bytes:
        stream = self._stream()
        if stream is None:
            raise _AllStreamsFull
        call_id = next(self._ids)
        frame = Frame(id=call_id, method=method, payload=payload)
        if timeout_s is not None:
            frame.timeout_us = max(1, int(timeout_s * 1e6))
        if metadata:
            for key, value in metadata:
                frame.metadata[key] = value if isinstance(value, str) else value.decode(errors="replace")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        stream.pending[call_id] = waiter
        stream.send(frame)
        try:
            async with asyncio.timeout(timeout_s):
                answer = await waiter
        except TimeoutError:
            if stream.pending.pop(call_id, None) is not None:
                stream.cancel(call_id)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "Deadline Exceeded"
            ) from None
        except asyncio.CancelledError:
            if stream.pending.pop(call_id, None) is not None:
                stream.cancel(call_id)
            raise
        finally:
            stream.pending.pop(call_id, None)
            stream.maybe_finish()
        if answer.code:
            raise grpc.aio.AioRpcError(
                _STATUS_BY_VALUE.get(answer.code, grpc.StatusCode.UNKNOWN),
                grpc.aio.Metadata(),
                _trailers(answer),
                answer.message,
            )
        payload_out: bytes = answer.payload
        return payload_out

    async def close(self) -> None:
        for stream in self._streams:
            if stream is not None:
                stream.close()
        self._streams = [None] * len(self._streams)


class _AllStreamsFull(Exception):
    """Every stream to the peer carries its maximum: the call goes unary."""


class StreamedMethod:
    """A unary method carried on hop streams; called as a grpc.aio unary multi-callable is, and awaited."""

    def __init__(
        self,
        streams: HopStreams,
        method: str,
        request_serializer: Callable[[Any], bytes] | None,
        response_deserializer: Callable[[bytes], Any] | None,
        fallback: grpc.aio.UnaryUnaryMultiCallable,
    ) -> None:
        self._streams = streams
        self._method = method
        self._serialize = request_serializer
        self._deserialize = response_deserializer
        self._fallback = fallback

    async def __call__(
        self,
        request: Any,
        timeout: float | None = None,  # noqa: ASYNC109  # grpc's signature: a drop-in for a unary multi-callable
        metadata: Metadata | None = None,
    ) -> Any:
        if telemetry.tracing_enabled():
            return await self._traced(request, timeout, metadata)
        return await self._send(request, timeout, metadata)

    async def _send(self, request: Any, timeout_s: float | None, metadata: Metadata | None) -> Any:
        streams = self._streams
        on_stream = streams.begin()
        try:
            if on_stream:
                payload = self._serialize(request) if self._serialize is not None else request
                with contextlib.suppress(_AllStreamsFull):  # every stream full: the unary call below
                    answer = await streams.call(self._method, payload, timeout_s, metadata)
                    return self._deserialize(answer) if self._deserialize is not None else answer
            return await self._fallback(request, timeout=timeout_s, metadata=metadata)
        finally:
            streams.end()

    async def _traced(self, request: Any, timeout_s: float | None, metadata: Metadata | None) -> Any:
        """A client span per call, its `traceparent` in the message's metadata (as the unary path's interceptor)."""
        service, _, rpc = self._method.lstrip("/").partition("/")
        attributes: dict[str, telemetry.AttributeValue] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
            "infermesh.hop_stream": True,
        }
        with telemetry.tracer.start_as_current_span(
            self._method, kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as current:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            try:
                response = await self._send(request, timeout_s, [*(metadata or ()), *carrier.items()])
            except grpc.aio.AioRpcError as error:
                current.set_attribute("rpc.grpc.status_code", error.code().value[0])
                current.set_status(Status(StatusCode.ERROR, error.code().name))
                raise
            except asyncio.CancelledError:
                current.set_status(Status(StatusCode.ERROR, "CANCELLED"))
                raise
            current.set_attribute("rpc.grpc.status_code", 0)
            return response


# Server side ------------------------------------------------------------------------------------------------


class _FrameAbort(grpc.aio.AbortError):  # type: ignore[misc]  # grpc is untyped
    """A handler aborted its call: what the answer frame carries."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Metadata) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers


class FrameContext:
    """The ServicerContext a handler sees for a call that arrived as a frame: the frame's deadline and metadata,
    the stream's peer and TLS identity; abort() ends the call with a status frame."""

    __slots__ = ("_code", "_deadline", "_details", "_metadata", "_stream_context")

    def __init__(self, frame: Any, stream_context: grpc.aio.ServicerContext) -> None:
        self._stream_context = stream_context
        self._deadline = time.monotonic() + frame.timeout_us / 1e6 if frame.timeout_us else None
        self._metadata = tuple(frame.metadata.items())
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> None:
        self._code = code
        raise _FrameAbort(code, details, trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        """Initial metadata has no place in a frame (only ServerMetadata sends any; it is not streamed)."""

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        """Trailing metadata travels only with a refusal (abort)."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return dict(self._stream_context.auth_context())

    def peer(self) -> str:
        return str(self._stream_context.peer())

    def peer_identities(self) -> Any:
        return self._stream_context.peer_identities()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


HandlerLookup = Callable[[str], grpc.RpcMethodHandler | None]


class HopStreamEndpoint:
    """Serves `HopStream/Exchange` on a server: each frame runs the server's own (wrapped) unary handler of its
    method; the stream answers frames as they finish. `lookup` finds a method's handler by its full name."""

    def __init__(self, lookup: HandlerLookup, max_inflight: int) -> None:
        self._lookup = lookup
        self._max_inflight = max_inflight
        self._draining = asyncio.Event()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Exchange": grpc.stream_stream_rpc_method_handler(
                    self._exchange,
                    request_deserializer=_tolerant_frame,
                    response_serializer=Frame.SerializeToString,
                )
            },
        )

    def drain(self) -> None:
        """Shutdown begins: refuse new frames (callers send them elsewhere), close streams once answered."""
        self._draining.set()

    async def _exchange(self, frames: Any, context: grpc.aio.ServicerContext) -> None:
        # Calls running by id (a cancel frame cancels one; a call leaves this table before its answer is written,
        # so a cancel never interrupts a write half-way). Answers are written by the calls' own tasks, one at a
        # time; refusals by the reader itself, so a caller that does not read its answers stops being read.
        running: dict[int, asyncio.Task[None]] = {}
        write_lock = asyncio.Lock()
        unanswered = 0
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()
        idle.set()

        async def send(reply: Any) -> None:
            async with write_lock:
                await context.write(reply)

        async def answer(frame: Any) -> None:
            nonlocal unanswered
            try:
                try:
                    reply = await self._run(frame, context)
                finally:
                    running.pop(frame.id, None)
                await send(reply)
            except (asyncio.CancelledError, Exception):  # the caller gave up, or the stream is gone: nobody to answer
                pass
            finally:
                unanswered -= 1
                if not unanswered:
                    idle.set()

        async def read() -> None:
            nonlocal unanswered
            async for frame in frames:
                if frame is None:  # unparseable: without an id there is nothing to answer; the stream is unusable
                    return
                if frame.cancel:
                    task = running.get(frame.id)
                    if task is not None:
                        task.cancel()
                    continue
                refusal = None
                if self._draining.is_set():
                    refusal = (grpc.StatusCode.UNAVAILABLE, "draining: send it again elsewhere")
                elif unanswered >= self._max_inflight or frame.id in running:
                    refusal = (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in flight on this hop stream")
                if refusal is not None:
                    try:
                        await send(Frame(id=frame.id, code=refusal[0].value[0], message=refusal[1]))
                    except Exception:  # the stream is gone
                        return
                    continue
                unanswered += 1
                idle.clear()
                running[frame.id] = loop.create_task(answer(frame))

        reader = loop.create_task(read())
        draining = loop.create_task(self._draining.wait())
        try:
            await asyncio.wait((reader, draining), return_when=asyncio.FIRST_COMPLETED)
            # The caller is done writing, or the server drains: answer what was taken, then end the stream.
            await idle.wait()
        finally:
            for task in (reader, draining, *running.values()):
                task.cancel()

    async def _run(self, frame: Any, stream_context: grpc.aio.ServicerContext) -> Any:
        handler = self._lookup(frame.method)
        if handler is None or handler.unary_unary is None:
            return Frame(id=frame.id, code=grpc.StatusCode.UNIMPLEMENTED.value[0], message="no such unary method")
        context = FrameContext(frame, stream_context)
        parent = propagate.extract(dict(frame.metadata)) if telemetry.tracing_enabled() else None
        try:
            with _server_span(frame.method, parent):
                request = (
                    handler.request_deserializer(frame.payload)
                    if handler.request_deserializer is not None
                    else frame.payload
                )
                response = await handler.unary_unary(request, context)
        except _FrameAbort as abort:
            trailers = {key: value if isinstance(value, bytes) else value.encode() for key, value in abort.trailers}
            return Frame(id=frame.id, code=abort.code.value[0], message=abort.details, trailers=trailers)
        payload = handler.response_serializer(response) if handler.response_serializer is not None else response
        return Frame(id=frame.id, payload=payload)


@contextlib.contextmanager
def _server_span(method: str, parent: Any) -> Any:
    """The server span of a call that arrived as a frame, in the caller's trace (as gRPC's server interceptor
    gives a unary call)."""
    if parent is None:
        yield
        return
    service, _, rpc = method.lstrip("/").partition("/")
    attributes: dict[str, telemetry.AttributeValue] = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": rpc,
        "infermesh.hop_stream": True,
    }
    with telemetry.tracer.start_as_current_span(
        method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    ):
        yield


def _tolerant_frame(data: bytes) -> Any:
    try:
        return Frame.FromString(data)
    except Exception:
        return None


Sender = Callable[..., Awaitable[Any]]
