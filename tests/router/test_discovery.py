"""Kubernetes-style discovery: the router resolves a headless Service name and keeps re-resolving."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient

from demo.processes import ServiceProcess
from router.discovery import resolve


async def test_resolve_returns_every_address_with_port() -> None:
    assert "127.0.0.1:8031" in await resolve("localhost:8031")


def test_router_starts_while_no_replica_resolves_and_finds_replicas_by_dns(demo_dir: Path, tmp_path: Path) -> None:
    replica = ServiceProcess(
        "model_service", "model_service", tmp_path, {"model_repository": demo_dir / "model_repository"}
    ).launch(timeout_s=120)
    router = ServiceProcess(
        "router",
        "router",
        tmp_path,
        {
            "model_repository": demo_dir / "model_repository",
            # Resolves to nothing (no ready pod yet, in Kubernetes terms): the router must still start.
            "model_service_dns": "no-such-replica.invalid:8031",
            "discovery_interval_s": 0.2,
        },
    )
    try:
        router.launch()
        client = grpcclient.InferenceServerClient(router.address)
        assert client.is_server_live()
        assert not client.is_server_ready()  # no replica known yet
        assert router.stop() == 0
        by_dns = ServiceProcess(
            "router",
            "router_by_dns",
            tmp_path,
            {"model_repository": demo_dir / "model_repository", "model_service_dns": f"localhost:{replica.port}"},
        ).launch()
        try:
            assert grpcclient.InferenceServerClient(by_dns.address).is_server_ready()  # replica found and healthy
        finally:
            by_dns.stop()
    finally:
        router.stop()
        replica.stop()
