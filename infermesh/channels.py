"""Client channels between services: created once per target, tuned, traced when tracing is on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from infermesh import telemetry
from infermesh.hop_streams import HopStreams
from infermesh.tls import ClientTls


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Our own retry policy (tenacity, deadline-aware) decides; C-core's transparent retries stay on.
        ("grpc.enable_retries", 1),
        # A dns:/// target with several addresses (e.g. a headless Service of routers) is balanced per
        # call; the default pick_first would send everything to the first address.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Reconnect quickly after a replica restarts.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def client_channel(
    target: str, max_message_bytes: int = 64 * 1024 * 1024, tls: ClientTls | None = None
) -> grpc.aio.Channel:
    """A channel to the next hop: plaintext, or TLS verifying the server against the mesh CA and presenting this
    service's certificate. The certificate files are read here, once: a channel keeps them (docs/security.md)."""
    options = channel_options(max_message_bytes)
    interceptors = telemetry.client_interceptors() or None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors)


class HopChannel:
    """The channel to one next hop of the mesh. Its internal unary calls (`internal()`) travel on hop streams
    when `streams` > 0 (infermesh.hop_streams), else as plain unary calls; everything else (health, readiness,
    the repository) stays on the channel's plain calls."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls: ClientTls | None = None,
        streams: int = 0,
        only_when_idle: bool = False,
        calls_per_stream: int = 256,
    ) -> None:
        self.channel = client_channel(target, max_message_bytes, tls)
        self.streams = HopStreams(self.channel, streams, calls_per_stream, only_when_idle) if streams else None
        self._connecting: asyncio.Task[None] | None = None  # one wait for a connection, shared by every caller

    async def connected_within(self, wait_s: float) -> bool:
        """Whether the channel is connected to the next hop, or connects within `wait_s` (it reconnects with
        backoff while the peer is down). Sends nothing; concurrent callers share one wait."""
        if wait_s <= 0:
            return False
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self.channel.channel_ready())
        try:
            await asyncio.wait_for(asyncio.shield(self._connecting), wait_s)
        except TimeoutError:
            return False
        return True

    def internal(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
    ) -> Callable[..., Awaitable[Any]]:
        """A unary method of the next hop, called as `channel.unary_unary(...)` gives and awaited."""
        if self.streams is None:
            call: Callable[..., Awaitable[Any]] = self.channel.unary_unary(
                method, request_serializer=request_serializer, response_deserializer=response_deserializer
            )
            return call
        return self.streams.unary_unary(method, request_serializer, response_deserializer)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        if self.streams is not None:
            await self.streams.close()
        await self.channel.close()
