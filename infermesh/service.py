"""Lifecycle shared by every service: one grpc.aio server with health, reflection, metrics, tracing.

start() binds (port 0 → a free port, reported in port_file), warms up, then reports SERVING.
SIGTERM/SIGINT → health NOT_SERVING → stop accepting and drain in-flight calls for grace_period_s → close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import start_http_server

from infermesh import __version__, metrics, telemetry
from infermesh.hop_streams import HopStreamEndpoint
from infermesh.logs import configure_logging
from infermesh.method_handlers import BodyWaits, Gate, ServiceHandlers, bounded_health
from infermesh.settings import ServiceSettings
from infermesh.tls import ReloadingServerCredentials

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

# The health port's own bound on connections: probes (kubelet, a load balancer) need a few, and a flood of the
# health port must not use up the process's file descriptors either.
HEALTH_PORT_MAX_CONNECTIONS = 256


class Service(ABC):
    """Subclasses register their servicers and own their resources; this class runs the server."""

    name: str = "service"
    # Whether the mesh's own callers reach this service over hop streams (all but the public gateway).
    serves_hop_streams: bool = True
    # A service whose calls need credentials decides each call as it starts (call_gate), before gRPC reads a
    # message of it: an unauthenticated call, its body never sent, would otherwise hold a call slot.
    gates_calls: bool = False

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.port = 0
        self.health_port = -1
        self.health_server: grpc.aio.Server | None = None
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None
        self._stopping = asyncio.Event()
        self._service_names: list[str] = []
        self._serving = False  # between start and shutdown: service statuses follow service_serving()
        self.tls_credentials: ReloadingServerCredentials | None = None
        self.hop_streams: HopStreamEndpoint | None = None

    @abstractmethod
    async def register(self, server: grpc.aio.Server) -> list[str]:
        """Add servicers to `server` (a registrar that wraps every handler with the status mapping and metrics
        as it is added); return their full service names (for health and reflection)."""

    def call_gate(self) -> Gate | None:
        """With `gates_calls`: what decides each call from its method and metadata as it starts (after
        register)."""
        return None

    async def service_serving(self, service_name: str) -> bool:
        """Whether one of the registered services can serve now (its grpc.health.v1 status; the server's own
        status, "", says only that the process is up). Checked when the server starts serving and whenever a
        subclass calls `publish_health`."""
        return True

    async def publish_health(self) -> None:
        """Bring each registered service's health status up to date (after start, until shutdown)."""
        if self._serving:
            for service_name in self._service_names:
                serving = await self.service_serving(service_name)
                status = (
                    health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self.health.set(service_name, status)

    async def warm_up(self) -> None:
        """Work to finish before reporting SERVING (load models, connect to Redis…)."""

    def other_ports(self) -> dict[str, int]:
        """Ports a service serves besides gRPC, API and health (reported in the port file)."""
        return {}

    async def before_drain(self) -> None:
        """Called when shutdown starts, before in-flight calls drain (e.g. report not ready)."""

    async def close(self) -> None:
        """Release resources after the server stopped."""

    async def start(self) -> None:
        settings = self.settings
        telemetry.configure_tracing(self.name)
        metrics.BUILD_INFO.labels(self.name).info({"version": __version__})
        interceptors = telemetry.server_interceptors()  # none unless tracing is configured
        backlog = (
            [
                ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_rpcs),
            ]
            if settings.max_pending_rpcs
            else []
        )
        server = grpc.aio.server(
            interceptors=interceptors or None,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                *connection_options(settings),
                *backlog,
            ],
        )
        self.server = server
        handlers = ServiceHandlers(self.name, gated=self.gates_calls)
        registrar = handlers.registrar(server)
        service_names = await self.register(registrar)
        handlers.gate = self.call_gate()
        if self.serves_hop_streams:
            # Registered unwrapped: each message runs its method's wrapped handler (counted, mapped) itself.
            self.hop_streams = HopStreamEndpoint(handlers.lookup, settings.hop_stream_max_inflight)
            server.add_generic_rpc_handlers((self.hop_streams.generic_handler(),))
        server.add_generic_rpc_handlers((bounded_health(self.health, BodyWaits()),))
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for service_name in service_names:
            await self.health.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflected = [*service_names, health_name, reflection.SERVICE_NAME]
        # Through the registrar: gated too where calls are (an idle reflection stream would hold a call slot).
        # enable_server_reflection() would pick its sync servicer for anything but a grpc.aio.Server itself.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(reflected), registrar)
        address = f"{_host_for_bind(settings.host)}:{settings.port}"
        server_tls = settings.server_tls()
        if server_tls is None:
            self.port = server.add_insecure_port(address)
        else:
            self.tls_credentials = ReloadingServerCredentials(server_tls)
            self.port = server.add_secure_port(address, self.tls_credentials.credentials())
        if self.port == 0:
            raise RuntimeError(f"could not bind {settings.host}:{settings.port}")
        if settings.health_port >= 0:
            # Probes get a server of their own: no call limit, no backlog shared with the API, so a saturated
            # or flooded API port never makes a liveness probe fail (and Kubernetes restart a busy pod).
            # Plaintext even with TLS on: it answers only grpc.health.v1 statuses, and kubelet's gRPC probes
            # speak no TLS.
            self.health_server = grpc.aio.server(
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_allowed_incoming_connections", HEALTH_PORT_MAX_CONNECTIONS),
                    ("grpc.server_handshake_timeout_ms", _ms(settings.handshake_timeout_s)),
                ]
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(
                f"{_host_for_bind(settings.host)}:{settings.health_port}"
            )
            if self.health_port == 0:
                raise RuntimeError(f"could not bind {settings.host}:{settings.health_port}")
            await self.health_server.start()
        if settings.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
            self.metrics_port = self._metrics_server.server_port
        await server.start()
        try:
            await self.warm_up()
        except BaseException:
            await server.stop(None)  # a failed start leaves no half-running server behind
            if self.health_server is not None:
                await self.health_server.stop(None)
            with contextlib.suppress(Exception):
                await self.close()
            raise
        # What is loaded by now (modules, settings, the model) lives as long as the process: keep it out of
        # the cyclic collector's full passes. Measured under load at c=64: the gateway's full collections
        # paused it up to 39 ms each (250 ms in 15 s); after the freeze they took ~1 ms.
        gc.collect()
        gc.freeze()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._service_names = service_names
        self._serving = True
        await self.publish_health()
        self._write_port_file()
        log.info(
            "serving",
            extra={
                "fields": {
                    "port": self.port,
                    "metrics_port": self.metrics_port,
                    "tls": server_tls is not None,
                    "pid": os.getpid(),
                }
            },
        )

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("draining", extra={"fields": {"grace_s": grace}})
        self._serving = False
        await self.health.enter_graceful_shutdown()
        if self.hop_streams is not None:
            self.hop_streams.drain()
        await self.before_drain()
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(None)  # probes saw NOT_SERVING for the whole drain
        await self.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        telemetry.shutdown_tracing()
        log.info("stopped")

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        await self.start()
        await self._stopping.wait()
        await self.stop()

    def _write_port_file(self) -> None:
        if self.settings.port_file is None:
            return
        path = self.settings.port_file
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        ports = {"port": self.port, "health_port": self.health_port, "metrics_port": self.metrics_port}
        temporary.write_text(json.dumps({**ports, **self.other_ports(), "pid": os.getpid()}))
        temporary.replace(path)  # atomic: readers never see a half-written file


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def connection_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """gRPC server options that bound what one client connection may hold, and for how long."""
    return [
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(settings.min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_s)),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.server_handshake_timeout_ms", _ms(settings.handshake_timeout_s)),
    ]


def _host_for_bind(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main(factory: Callable[[], Service]) -> None:
    """Entry point of `python -m <service>`."""
    service = factory()
    configure_logging(service.name, service.settings.log_level)
    try:
        import uvloop  # measurably faster per call than asyncio's loop here (docs/performance.md)
    except ImportError:  # e.g. a platform without uvloop wheels
        asyncio.run(service.run())
    else:
        uvloop.run(service.run())
