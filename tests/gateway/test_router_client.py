"""Waiting for a next hop that is down (the gateway's router restarting): HopChannel.connected_within is False
when nothing listens within the wait, and True as soon as a server comes up on the address meanwhile.
(gateway.router_client itself is not imported: it loads the mesh's OIP stubs, which must stay out of the test
process next to tritonclient's; tests/e2e/test_supervision.py drives it through `make run`.)"""

from __future__ import annotations

import asyncio
import socket

import grpc

from infermesh.channels import HopChannel


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_nothing_listening_is_not_connected_once_the_wait_is_over() -> None:
    hop = HopChannel(f"127.0.0.1:{closed_port()}")
    try:
        assert await hop.connected_within(0.0) is False
        waits = [hop.connected_within(0.3) for _ in range(5)]  # concurrent callers share one wait
        assert await asyncio.gather(*waits) == [False] * 5
    finally:
        await hop.close()


async def test_a_server_coming_up_during_the_wait_ends_it() -> None:
    port = closed_port()
    hop = HopChannel(f"127.0.0.1:{port}")
    server = grpc.aio.server()
    try:
        waiting = asyncio.create_task(hop.connected_within(30.0))
        await asyncio.sleep(0.3)  # the channel fails to connect meanwhile, and backs off
        assert not waiting.done()
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        await server.start()
        assert await asyncio.wait_for(waiting, 20.0) is True
        assert await hop.connected_within(0.1) is True  # connected now: no wait
    finally:
        await hop.close()
        await server.stop(None)
