"""Model replica discovery in Kubernetes: every address behind a headless Service's DNS name."""

from __future__ import annotations

import asyncio
import socket


async def resolve(host_port: str) -> list[str]:
    """All addresses behind a (headless Service) DNS name, as host:port."""
    host, _, port = host_port.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    addresses = []
    for family, _type, _proto, _name, sockaddr in infos:
        ip = sockaddr[0]
        addresses.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(set(addresses))
