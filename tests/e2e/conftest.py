"""The whole mesh as real processes (private redis-server, 2 model replicas, router, gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.mesh import LocalMesh
from tests.e2e.meshes import start_mesh


@pytest.fixture(scope="session")
def mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    running = start_mesh(demo_dir, tmp_path_factory.mktemp("mesh"))
    yield running
    running.stop()
