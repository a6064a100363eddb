"""`infermesh models …` against the whole mesh as `make run` starts it, with an admin key next to a tenant's."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from demo.mesh import ApiKey, LocalMesh, MeshOptions
from tests.cli.runner import run_cli
from tests.e2e.meshes import DEMO_KEY, auth, fraud_inputs

ADMIN_KEY = "test-cli-admin-key-0123456789"


@pytest.fixture(scope="module")
def admin_mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The mesh on a copy of the demo repository (loads must not touch the shared one), with an admin key."""
    run_dir = tmp_path_factory.mktemp("cli-mesh")
    repository = run_dir / "model_repository"
    shutil.copytree(demo_dir / "model_repository", repository)
    options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[
            ApiKey(DEMO_KEY, "demo", ["fraud", "bench_mlp"]),
            ApiKey(ADMIN_KEY, "ops", ["*"], role="admin"),
        ],
        model_repository=repository,
    )
    mesh = LocalMesh(options).start()
    yield mesh
    mesh.stop()


def admin(mesh: LocalMesh, *args: str, timeout: str = "30") -> Any:
    return run_cli("models", *args, "--url", mesh.gateway_address, "--timeout", timeout, INFERMESH_API_KEY=ADMIN_KEY)


def test_list_shows_fraud_version_1_ready(admin_mesh: LocalMesh) -> None:
    result = admin(admin_mesh, "list", "--json")

    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {"name": "fraud", "version": "1", "state": "READY", "reason": ""} in rows
    table = admin(admin_mesh, "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]


def test_stats_count_an_inference(admin_mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(admin_mesh.gateway_address)
    try:
        client.infer("fraud", fraud_inputs(["u1"], ["m1"], [12.5]), headers=auth())
    finally:
        client.close()

    deadline = time.monotonic() + 15
    while True:  # statistics may reach the gateway a moment after the answer
        result = admin(admin_mesh, "stats", "fraud", "--json")
        assert result.returncode == 0, result.stderr
        fraud = [row for row in json.loads(result.stdout) if row["name"] == "fraud" and row["version"] == "1"]
        if fraud and fraud[0]["inference_count"] >= 1:
            break
        assert time.monotonic() < deadline, f"no inference counted: {result.stdout}"
        time.sleep(0.2)
    assert fraud[0]["success_count"] >= 1
    assert fraud[0]["last_inference"] is not None


def test_load_exits_0_and_fraud_stays_ready(admin_mesh: LocalMesh) -> None:
    result = admin(admin_mesh, "load", "fraud", timeout="120")

    assert result.returncode == 0, result.stderr
    listed = json.loads(admin(admin_mesh, "list", "--json").stdout)
    assert {"name": "fraud", "version": "1", "state": "READY", "reason": ""} in listed


def test_a_key_without_the_admin_role_is_permission_denied(admin_mesh: LocalMesh) -> None:
    result = run_cli("models", "list", "--url", admin_mesh.gateway_address, INFERMESH_API_KEY=DEMO_KEY)

    assert result.returncode == 1
    assert "error: PERMISSION_DENIED" in result.stderr
    assert DEMO_KEY not in result.stderr


def test_no_key_is_unauthenticated_with_a_hint(admin_mesh: LocalMesh) -> None:
    result = run_cli("models", "list", "--url", admin_mesh.gateway_address)

    assert result.returncode == 1
    assert "error: UNAUTHENTICATED" in result.stderr
    assert "INFERMESH_API_KEY" in result.stderr
