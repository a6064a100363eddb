"""A flood of connections against a real service process (the feature service here; every service builds its
gRPC server the same way, infermesh.service): past MAX_CONNECTIONS a new connection is closed as it is accepted,
so the flood cannot use up the process's file descriptors; a client already connected keeps being served; a
connection that never completes its handshake is closed after HANDSHAKE_TIMEOUT_S."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.redis_server import RedisServer
from tests.feature_service.test_feature_service_grpc import start_service

# The HTTP/2 client preface and an empty SETTINGS frame: a handshake completed, then nothing.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SERVING = health_pb2.HealthCheckResponse.SERVING


def closed_by_server(connection: socket.socket, within_s: float) -> bool:
    """Whether the server closes `connection` within `within_s` (end of stream or reset)."""
    connection.settimeout(within_s)
    try:
        while connection.recv(4096):  # the server's SETTINGS and the like, until it closes
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_connection_flood_is_refused_at_the_cap_and_a_connected_client_is_unaffected(
    redis_server: RedisServer, views_file: Path, tmp_path: Path
) -> None:
    cap, flood_size = 8, 60
    service = start_service(tmp_path, redis_server.url, views_file, max_connections=cap, handshake_timeout_s=0.5)
    assert service.process is not None
    host, port = service.address.rsplit(":", 1)
    flood: list[socket.socket] = []
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING
            before = open_descriptors(service.process.pid)
            for _ in range(flood_size):
                connection = socket.create_connection((host, int(port)))
                connection.sendall(PREFACE)
                flood.append(connection)
            closed = await asyncio.gather(*(asyncio.to_thread(closed_by_server, c, 2.0) for c in flood))
            # Every connection past the cap was closed at once; the ones within it were kept.
            assert sum(closed) >= flood_size - cap
            assert sum(closed) < flood_size
            assert open_descriptors(service.process.pid) <= before + cap
            # The client that was connected before the flood is served all along.
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING

            for connection in flood:
                connection.close()
            flood.clear()
            # A connection that says nothing at all is closed once its handshake time is over (gRPC's own
            # default would hold it for two minutes).
            silent = socket.create_connection((host, int(port)))
            flood.append(silent)
            assert await asyncio.to_thread(closed_by_server, silent, 10.0)

        # With the flood gone, a new client connects and is served.
        async with grpc.aio.insecure_channel(service.address, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
            reply = await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == SERVING
    finally:
        for connection in flood:
            connection.close()
        service.stop()
