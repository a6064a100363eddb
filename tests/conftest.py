"""Shared fixtures: the demo data (as `make demo` builds it), free-port private services, and the whole mesh
(used by the end-to-end tests and the benchmark smoke test)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.mesh import LocalMesh
from demo.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's feature views and model repository; built here when `make demo` has not run."""
    configured = Path(os.environ.get("INFERMESH_DEMO_DIR", ROOT / ".run" / "demo"))
    if (configured / ".ready").exists():
        return configured
    from demo.setup import prepare

    built = tmp_path_factory.mktemp("demo")
    prepare(built)
    return built


@pytest.fixture(scope="session")
def mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The whole mesh as real processes (private redis-server, 2 model replicas, router, gateway)."""
    from tests.e2e.meshes import start_mesh

    running = start_mesh(demo_dir, tmp_path_factory.mktemp("mesh"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tls_mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The mesh with TLS on every hop (mutual TLS inside), with certificates made by `make certs`' code."""
    from tests.e2e.meshes import start_mesh

    run_dir = tmp_path_factory.mktemp("tls_mesh")
    running = start_mesh(demo_dir, run_dir, tls_dir=run_dir / "certs", replicas=1)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def unary_mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The mesh with hop streams off: every internal call a unary gRPC call (the fallback setting)."""
    from tests.e2e.meshes import start_mesh

    unary = {"hop_streams": 0}
    running = start_mesh(demo_dir, tmp_path_factory.mktemp("unary_mesh"), replicas=1, gateway=unary, router=unary)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests that break Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
