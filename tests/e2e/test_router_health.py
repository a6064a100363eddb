"""The router's health tells the truth: its services are NOT_SERVING while it has no healthy model replica (a
readiness probe takes it out of rotation) and SERVING again once one is back; the process itself stays
SERVING (a liveness probe must not restart it for its replicas' sake)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.processes import ServiceProcess

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
API = "inference.GRPCInferenceService"


@pytest.fixture
def router_and_replica(demo_dir: Path, tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    repository = demo_dir / "model_repository"
    replica = ServiceProcess("model_service", "model_service_0", tmp_path, {"model_repository": repository})
    replica.launch(120)
    router = ServiceProcess(
        "router",
        "router",
        tmp_path,
        {
            "model_repository": repository,
            "model_replicas": replica.address,
            "feature_service_address": "127.0.0.1:1",  # not needed here
            "health_interval_s": 0.1,
        },
    )
    router.launch()
    yield router, replica
    router.stop()
    replica.stop()


def status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def wait_for(address: str, service: str, wanted: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while status(address, service) != wanted:
        assert time.monotonic() < deadline, f"{service or 'server'} never became {wanted}"
        time.sleep(0.05)  # poll the router's health, as a probe does


def test_the_router_is_not_serving_without_a_healthy_replica(
    router_and_replica: tuple[ServiceProcess, ServiceProcess],
) -> None:
    router, replica = router_and_replica
    assert status(router.address, API) == SERVING
    replica.kill()
    wait_for(router.address, API, NOT_SERVING)
    assert status(router.address, "infermesh.router.v1.Router") == NOT_SERVING
    assert status(router.address, "") == SERVING  # alive: nothing to restart
    back = ServiceProcess(replica.module, replica.name, replica.run_dir, {**replica.settings, "port": replica.port})
    back.launch(120)
    try:
        wait_for(router.address, API, SERVING)
    finally:
        back.stop()
