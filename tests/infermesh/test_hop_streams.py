"""Hop streams against a real grpc.aio server: calls carried as messages behave as the unary calls they stand for
(answers, statuses, answered-by trailers, metadata, deadlines, cancellation), break and drain safely, and stay
bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from infermesh import errors
from infermesh.channels import HopChannel
from infermesh.hop_streams import EXCHANGE, SERVICE, FrameContext, HopStreamEndpoint
from infermesh.method_handlers import ANSWERED_BY, TENANT_METADATA, ServiceHandlers, answered_by, deadline_of
from infermesh.proto import hop_stream_pb2

METHOD = "/test.Echo/Call"


@dataclass
class Echo:
    """A unary method whose request says what to do: `echo:<x>`, `slow:<ms>:<x>`, `hold`, `refuse`, `crash`,
    `tenant`, `deadline`."""

    contexts: list[Any] = field(default_factory=list)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0
    cancelled: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until(self, predicate: Any) -> None:
        """Wait (at most 5 s) until `predicate()` holds: the server runs in this event loop."""
        async with asyncio.timeout(5), self.changed:
            await self.changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.contexts.append(context)
        verb, _, rest = request.decode().partition(":")
        if verb == "slow":
            delay_ms, _, rest = rest.partition(":")
            await asyncio.sleep(int(delay_ms) / 1000)
            return rest.encode()
        if verb == "hold":
            self.holding += 1
            await self._notify()
            try:
                await self.held.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                self.holding -= 1
                asyncio.get_running_loop().create_task(self._notify())
                raise
            self.holding -= 1
            return b"released"
        if verb == "refuse":
            raise errors.Overloaded("tenant over its quota", retry_after_s=0.5)
        if verb == "crash":
            raise RuntimeError("secret internal detail")
        if verb == "tenant":
            return dict(context.invocation_metadata()).get(TENANT_METADATA, "").encode()
        if verb == "deadline":
            return f"{deadline_of(context, 99.0).remaining():.3f}".encode()
        return rest.encode()


@dataclass
class Server:
    server: grpc.aio.Server
    endpoint: HopStreamEndpoint
    echo: Echo
    address: str


async def start_server(max_inflight: int = 64) -> Server:
    echo = Echo()
    server = grpc.aio.server()
    handlers = ServiceHandlers("test")
    registrar = handlers.registrar(server)
    registrar.add_registered_method_handlers("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo.call)})
    endpoint = HopStreamEndpoint(handlers.lookup, max_inflight)
    server.add_generic_rpc_handlers((endpoint.generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return Server(server, endpoint, echo, f"127.0.0.1:{port}")


@pytest.fixture
async def served() -> AsyncIterator[Server]:
    server = await start_server()
    yield server
    await server.server.stop(None)


async def held_by(echo: Echo, count: int) -> None:
    await echo.until(lambda: echo.holding >= count)


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def test_the_exchange_method_is_the_protos() -> None:
    assert f"/{SERVICE}/Exchange" == EXCHANGE
    assert hop_stream_pb2.DESCRIPTOR.services_by_name["HopStream"].full_name == SERVICE


async def test_calls_on_one_stream_are_answered_out_of_order(served: Server) -> None:
    hop = HopChannel(served.address, streams=1)
    call = hop.internal(METHOD)
    try:
        slow = asyncio.create_task(call(b"slow:300:first", timeout=5))
        await asyncio.sleep(0.01)  # the slow call is on the stream first
        assert await asyncio.wait_for(call(b"echo:second", timeout=5), 0.25) == b"second"
        assert not slow.done()  # the fast answer overtook it
        assert await slow == b"first"
        assert all(isinstance(context, FrameContext) for context in served.echo.contexts)
    finally:
        await hop.close()


async def test_a_refusal_carries_the_unary_calls_status_details_and_answered_by(served: Server) -> None:
    hop = HopChannel(served.address, streams=1)
    try:
        error = await refusal(hop.internal(METHOD)(b"refuse", timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "tenant over its quota"
        assert answered_by(error) == "test"
        assert any(key == "grpc-status-details-bin" for key, _ in error.trailing_metadata())  # the retry hint
        crash = await refusal(hop.internal(METHOD)(b"crash", timeout=5))
        assert crash.code() == grpc.StatusCode.INTERNAL
        assert crash.details() == "internal error"  # the exception's text stays in the server's log
        unknown = await refusal(hop.internal("/test.Echo/Nope")(b"x", timeout=5))
        assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await hop.close()


async def test_metadata_and_the_deadline_travel_with_each_call(served: Server) -> None:
    hop = HopChannel(served.address, streams=2)
    call = hop.internal(METHOD)
    try:
        assert await call(b"tenant", timeout=5, metadata=((TENANT_METADATA, "acme"),)) == b"acme"
        remaining = float(await call(b"deadline", timeout=2.0))
        assert 1.0 < remaining <= 2.0  # the caller's deadline, not the server's default of 99 s
    finally:
        await hop.close()


async def test_a_call_past_its_deadline_fails_and_its_work_is_cancelled(served: Server) -> None:
    hop = HopChannel(served.address, streams=1)
    call = hop.internal(METHOD)
    try:
        error = await refusal(call(b"hold", timeout=0.1))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await served.echo.until(lambda: served.echo.cancelled == 1)  # the cancel message reached the server
        assert await call(b"echo:still-open", timeout=5) == b"still-open"  # the stream itself is fine
    finally:
        await hop.close()


async def test_a_cancelled_caller_cancels_the_work_downstream(served: Server) -> None:
    hop = HopChannel(served.address, streams=1)
    try:
        waiting = asyncio.create_task(hop.internal(METHOD)(b"hold", timeout=30))
        await held_by(served.echo, 1)
        waiting.cancel()
        await served.echo.until(lambda: served.echo.cancelled == 1)
        assert served.echo.holding == 0
    finally:
        await hop.close()


async def test_a_broken_stream_fails_only_its_calls_as_never_answered_and_the_next_call_reconnects() -> None:
    first = await start_server()
    hop = HopChannel(first.address, streams=1)
    call = hop.internal(METHOD)
    try:
        waiting = asyncio.create_task(call(b"hold", timeout=30))
        await held_by(first.echo, 1)
        port = first.address.rsplit(":", 1)[1]
        await first.server.stop(None)  # the peer goes away mid-call
        error = await refusal(waiting)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert answered_by(error) is None  # nobody answered it: a caller may send it again
        # A server back on the same port: the next call opens a fresh stream.
        second = grpc.aio.server()
        handlers = ServiceHandlers("test")
        echo = Echo()
        handlers.registrar(second).add_registered_method_handlers(
            "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo.call)}
        )
        second.add_generic_rpc_handlers((HopStreamEndpoint(handlers.lookup, 8).generic_handler(),))
        assert second.add_insecure_port(f"127.0.0.1:{port}") == int(port)
        await second.start()
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        assert await call(b"echo:back", timeout=2) == b"back"
                        break
                    except grpc.aio.AioRpcError as retry:
                        assert retry.code() == grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.05)
        finally:
            await second.stop(None)
    finally:
        await hop.close()


async def test_a_full_stream_sends_the_call_unary_and_the_server_bounds_what_a_stream_carries() -> None:
    served = await start_server(max_inflight=2)
    bounded = HopChannel(served.address, streams=1, calls_per_stream=1)
    greedy = HopChannel(served.address, streams=1, calls_per_stream=10)
    try:
        held = asyncio.create_task(bounded.internal(METHOD)(b"hold", timeout=30))
        await held_by(served.echo, 1)
        # The caller's one stream is full: the next call goes as a plain unary call, and is answered.
        assert await bounded.internal(METHOD)(b"echo:unary", timeout=5) == b"unary"
        assert not isinstance(served.echo.contexts[-1], FrameContext)
        # A caller ignoring the server's bound is refused past it, answered at once.
        greedy_held = [asyncio.create_task(greedy.internal(METHOD)(b"hold", timeout=30)) for _ in range(2)]
        await held_by(served.echo, 3)
        error = await refusal(greedy.internal(METHOD)(b"echo:third", timeout=5))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        served.echo.held.set()
        assert await held == b"released"
        assert await asyncio.gather(*greedy_held) == [b"released", b"released"]
    finally:
        await bounded.close()
        await greedy.close()
        await served.server.stop(None)


async def test_only_when_idle_a_call_takes_a_stream_while_no_other_call_of_the_process_is_in_flight(
    served: Server,
) -> None:
    """The mesh's rule: a stream at low load, a unary call while other internal calls are in flight."""
    hop = HopChannel(served.address, streams=2, only_when_idle=True)
    other_peer = HopChannel(served.address, streams=1, only_when_idle=True)  # another channel: the count is shared
    call = hop.internal(METHOD)

    def on_stream() -> bool:
        return isinstance(served.echo.contexts[-1], FrameContext)

    try:
        held = asyncio.create_task(call(b"hold", timeout=30))
        await held_by(served.echo, 1)
        assert on_stream()  # nothing else in flight
        assert await call(b"echo:concurrent", timeout=5) == b"concurrent"
        assert not on_stream()  # one in flight: unary
        assert await other_peer.internal(METHOD)(b"echo:elsewhere", timeout=5) == b"elsewhere"
        assert not on_stream()  # in flight to another peer counts too
        served.echo.held.set()
        assert await held == b"released"
        for word in ("one", "two"):  # one after the other, nothing else in flight: each on a stream
            assert await call(f"echo:{word}".encode(), timeout=5) == word.encode()
            assert on_stream()
    finally:
        await hop.close()
        await other_peer.close()


async def test_a_draining_server_answers_what_it_took_and_sends_new_calls_elsewhere(served: Server) -> None:
    hop = HopChannel(served.address, streams=1)
    call = hop.internal(METHOD)
    try:
        taken = asyncio.create_task(call(b"hold", timeout=30))
        await held_by(served.echo, 1)
        served.endpoint.drain()
        error = await refusal(call(b"echo:late", timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert answered_by(error) is None  # to be sent again to another replica
        served.echo.held.set()
        assert await taken == b"released"
    finally:
        await hop.close()


async def test_unary_fallback_setting_sends_plain_calls(served: Server) -> None:
    hop = HopChannel(served.address, streams=0)
    try:
        assert await hop.internal(METHOD)(b"echo:plain", timeout=5) == b"plain"
        assert not isinstance(served.echo.contexts[-1], FrameContext)
        error = await refusal(hop.internal(METHOD)(b"refuse", timeout=5))
        assert (error.code(), answered_by(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "test")
        assert ANSWERED_BY in dict(error.trailing_metadata())
    finally:
        await hop.close()


async def test_callers_cancelled_or_timed_out_at_any_moment_leave_the_stream_working(served: Server) -> None:
    """A caller may be cancelled while its message is being written (a coalescer's batch whose clients left, a
    deadline): that must never break the stream for the calls beside it."""
    hop = HopChannel(served.address, streams=1)
    call = hop.internal(METHOD)
    try:
        storm = [
            asyncio.create_task(call(f"slow:{i % 4}:{i}".encode(), timeout=0.0005 * (i % 7) + 0.0001))
            for i in range(300)
        ]
        await asyncio.sleep(0)  # every call has queued its message
        assert hop.streams is not None
        stream = hop.streams._streams[0]
        for task in storm[::3]:
            task.cancel()
        await asyncio.gather(*storm, return_exceptions=True)
        survivors = [asyncio.create_task(call(f"echo:{i}".encode(), timeout=5)) for i in range(50)]
        assert await asyncio.gather(*survivors) == [str(i).encode() for i in range(50)]
        assert hop.streams._streams[0] is stream and stream is not None and stream.open  # the same stream throughout
    finally:
        await hop.close()
