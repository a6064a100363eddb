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
ADMIN_ENV = {"INFERMESH_API_KEY": ADMIN_KEY}


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


def rollout(mesh: LocalMesh, *args: str) -> Any:
    result = run_cli(
        "rollout", *args, "--url", mesh.gateway_address, "--timeout", "60", "--json", INFERMESH_API_KEY=ADMIN_KEY
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def answered_by(mesh: LocalMesh, users: list[str]) -> set[str]:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    try:
        answers = [client.infer("fraud", fraud_inputs([u], ["m1"], [12.5]), headers=auth()) for u in users]
    finally:
        client.close()
    return {answer.get_response().model_version for answer in answers}


def test_rollout_canary_shadow_promote_and_off(admin_mesh: LocalMesh) -> None:
    users = [f"u{i}" for i in range(40)]
    canary = rollout(admin_mesh, "canary", "fraud", "2", "--weight", "30", "--sticky", "user_id")
    assert canary["traffic"]["split"] == {"1": 70, "2": 30}
    shown = rollout(admin_mesh, "show", "fraud")
    assert shown["traffic"]["split"] == {"1": 70, "2": 30} and shown["traffic"]["guard"]["max_error_ratio"] == 0.01
    assert {(v["version"], v["state"]) for v in shown["versions"]} == {("1", "READY"), ("2", "READY")}
    assert answered_by(admin_mesh, users) == {"1", "2"}
    shadowing = run_cli("rollout", "shadow", "fraud", "2", "--url", admin_mesh.gateway_address, **ADMIN_ENV)
    assert shadowing.returncode == 1 and "version 2 also answers" in shadowing.stderr  # it is in the split
    promoted = rollout(admin_mesh, "promote", "fraud", "2")
    assert promoted["traffic"]["baseline"] == "2" and promoted["traffic"]["split"] == {"2": 100}
    assert answered_by(admin_mesh, users) == {"2"}
    refused = run_cli("rollout", "canary", "fraud", "2", "--url", admin_mesh.gateway_address, **ADMIN_ENV)
    assert refused.returncode == 1 and "is the baseline" in refused.stderr
    rollout(admin_mesh, "off", "fraud")  # the version policy again: the repository's config serves version 1
    assert rollout(admin_mesh, "show", "fraud")["traffic"] is None
    assert answered_by(admin_mesh, users) == {"1"}
