"""deploy/docker/grpc_health_check.py, the compose healthcheck, against a real gRPC health server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.artifacts import DEPLOY

SCRIPT = DEPLOY / "docker" / "grpc_health_check.py"


@pytest.fixture
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", servicer
    grpc_server.stop(None)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False)


def test_serving_is_healthy(server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = run(address)
    assert result.returncode == 0, result.stderr


def test_not_serving_is_unhealthy(server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining service reports
    result = run(address)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_named_service(server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("inference.GRPCInferenceService", health_pb2.HealthCheckResponse.SERVING)
    assert run(address, "--service", "inference.GRPCInferenceService").returncode == 0
    assert run(address, "--service", "unknown.Service").returncode == 1  # NOT_FOUND


def test_unreachable_is_unhealthy_within_the_timeout(server: tuple[str, health.HealthServicer]) -> None:
    address, _ = server
    host = address.rpartition(":")[0]
    result = run(f"{host}:1", "--timeout", "1")  # nothing listens on port 1
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
