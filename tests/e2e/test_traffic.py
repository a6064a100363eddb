"""Shipping a new version safely, through the gateway with tritonclient unchanged: a model's `traffic` section loaded
at run time (Triton's load with a config override) splits, mirrors, cascades and rolls back in the router."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from torch import nn
from tritonclient.utils import InferenceServerException

from demo.mesh import ApiKey, LocalMesh, MeshOptions
from demo.synthetic import user_id
from demo.train import save_torchscript
from infermesh.model_config import MODEL_FILE
from tests.e2e.meshes import DEMO_KEY, auth, fraud_inputs, metric

ADMIN_KEY = "test-traffic-admin-key-0123456789"
ADMIN = auth(ADMIN_KEY)


class BrokenOnRealInputs(nn.Module):
    """Passes the warm-up (zeros) and fails on every real request."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("broken canary")
        return torch.zeros(x.shape[0], 1)


class Slow(nn.Module):
    """Right answers, late: a few hundred million multiply-adds per batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ones(384, 384)
        for _ in range(16):
            y = torch.tanh(y @ y / 384.0)
        return torch.sigmoid(x[:, :1] * 0.0 + y[0, 0] - 10.0)


class Constant(nn.Module):
    """Always 0.99: far from any real answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), 0.99)


@pytest.fixture(scope="module")
def mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    run_dir = tmp_path_factory.mktemp("traffic")
    repository = run_dir / "model_repository"
    shutil.copytree(demo_dir / "model_repository", repository)
    for version, module in {"3": BrokenOnRealInputs(), "4": Slow(), "5": Constant()}.items():
        save_torchscript(module, repository / "fraud" / version / MODEL_FILE)
    options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[ApiKey(DEMO_KEY, "demo", ["fraud", "fraud_large"]), ApiKey(ADMIN_KEY, "ops", ["*"], role="admin")],
        model_repository=repository,
        router={"repository_refresh_s": 0.1},
        gateway={"repository_refresh_s": 0.2},
        model_service={"unload_grace_s": 0.5},
    )
    mesh = LocalMesh(options).start()
    yield mesh
    mesh.stop()


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    yield client
    client.load_model("fraud", headers=ADMIN)  # back to the repository's config: version 1, no traffic section
    wait_until(lambda: traffic_of(client) is None, "the folder's config")


def fraud_config(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    """`fraud`'s config as Triton shows it: the mesh's sections are JSON text in its parameters."""
    config: dict[str, Any] = client.get_model_config("fraud", headers=ADMIN, as_json=True)["config"]
    return config


def traffic_of(client: grpcclient.InferenceServerClient) -> dict[str, Any] | None:
    parameter = fraud_config(client).get("parameters", {}).get("infermesh.traffic")
    return json.loads(parameter["string_value"]) if parameter else None


def roll_out(client: grpcclient.InferenceServerClient, **traffic: Any) -> None:
    """Load `fraud` with this traffic section (the rest of its config as served), as `infermesh rollout` does."""
    config = fraud_config(client)
    config["traffic"] = traffic
    client.load_model("fraud", config=json.dumps(config), headers=ADMIN)
    wait_until(lambda: (traffic_of(client) or {}).get("split") == traffic.get("split", {}), "rollout")


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < give_up, f"timed out waiting for {what}"
        time.sleep(0.05)


def index(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    reply = client.get_model_repository_index(headers=ADMIN, as_json=True)
    return {m["version"]: (m["state"], m.get("reason", "")) for m in reply["models"] if m["name"] == "fraud"}


def infer(
    client: grpcclient.InferenceServerClient, user: str, version: str = "", model: str = "fraud", amount: float = 120.0
) -> tuple[str, str, float, dict[str, Any]]:
    """(answering version, arm, fraud probability, response parameters)."""
    inputs = fraud_inputs([user], ["m1"], [amount])
    result = client.infer(model, inputs, model_version=version, headers=auth())
    response = result.get_response(as_json=True)
    parameters = {k: next(iter(v.values())) for k, v in response.get("parameters", {}).items()}
    probability = float(result.as_numpy("fraud_probability")[0])
    return response["model_version"], parameters.get("infermesh_arm", ""), probability, parameters


def status_of(call: Callable[[], object]) -> str:
    try:
        call()
    except InferenceServerException as error:
        return str(error.status())
    return "OK"


def router_metric(mesh: LocalMesh, name: str, labels: str) -> float:
    assert mesh.router is not None
    return metric(mesh.router.metrics_port, name, labels)


def test_weights_not_adding_up_or_naming_a_missing_version_are_refused_and_change_nothing(
    mesh: LocalMesh, client: grpcclient.InferenceServerClient
) -> None:
    before = (fraud_config(client), index(client))
    for traffic in (
        {"baseline": "1", "split": {"1": 90, "2": 5}},
        {"baseline": "1", "split": {"1": 90, "9": 10}},
        {"baseline": "1", "split": {"1": 100}, "shadow": ["9"]},
    ):
        config = {**before[0], "traffic": traffic}
        load = lambda config=config: client.load_model("fraud", config=json.dumps(config), headers=ADMIN)  # noqa: E731
        assert status_of(load) == "StatusCode.INVALID_ARGUMENT"
    assert (fraud_config(client), index(client)) == before
    assert infer(client, "u1")[0] == "1"


def test_a_sticky_split_sends_each_user_to_one_version(
    mesh: LocalMesh, client: grpcclient.InferenceServerClient
) -> None:
    roll_out(client, baseline="1", split={"1": 50, "2": 50}, sticky_input="user_id")
    assert (traffic_of(client) or {})["sticky_input"] == "user_id"
    assert index(client) == {"1": ("READY", "baseline 50 %"), "2": ("READY", "canary 50 %")}
    users = [f"u{i}" for i in range(60)]
    first = {user: infer(client, user)[:2] for user in users}
    with ThreadPoolExecutor(8) as pool:  # concurrent: the gateway batches several users into one router call
        again = dict(zip(users, pool.map(lambda user: infer(client, user)[:2], users), strict=True))
    assert again == first
    arms = Counter(first.values())
    assert set(arms) == {("1", "baseline"), ("2", "canary")}
    assert min(arms.values()) >= 15  # about half each
    # A request naming its version gets it, whatever the split says.
    assert {infer(client, user, version="2")[:2] for user in users[:5]} == {("2", "requested")}


def test_a_broken_canary_is_rolled_back_and_no_client_sees_a_failure(
    mesh: LocalMesh, client: grpcclient.InferenceServerClient
) -> None:
    guard = {"window_s": 30, "min_requests": 10, "max_error_ratio": 0.1}
    roll_out(client, baseline="1", split={"1": 50, "3": 50}, guard=guard)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: infer(client, f"user-{i}")[:2], range(80)))
    assert {version for version, _ in answers} == {"1"}  # every request answered, by the baseline
    assert Counter(arm for _, arm in answers)["fallback"] >= 10  # the canary failed them; the baseline answered
    assert router_metric(mesh, "infermesh_rollbacks_total", 'model="fraud",rule="error_ratio",version="3"') == 1
    wait_until(lambda: index(client)["3"][1].startswith("rolled back: error ratio"), "the index to show it")
    wait_until(lambda: (traffic_of(client) or {}).get("split") == {"1": 100, "3": 0}, "the config to record it")
    assert {infer(client, f"user-{i}")[:2] for i in range(20)} == {("1", "baseline")}


def test_a_slow_canary_is_rolled_back_on_its_p99(mesh: LocalMesh, client: grpcclient.InferenceServerClient) -> None:
    guard = {"window_s": 30, "min_requests": 8, "max_error_ratio": 0.5, "max_p99_ms": 20}
    roll_out(client, baseline="1", split={"1": 50, "4": 50}, guard=guard)
    served = Counter()
    for i in range(200):
        served[infer(client, f"slow-{i}")[0]] += 1
        if router_metric(mesh, "infermesh_rollbacks_total", 'rule="p99",version="4"'):
            break
    assert router_metric(mesh, "infermesh_rollbacks_total", 'model="fraud",rule="p99",version="4"') == 1
    assert served["4"] >= 8
    wait_until(lambda: index(client)["4"][1].startswith("rolled back: p99"), "the index to show it")
    assert {infer(client, f"slow-{i}")[0] for i in range(20)} == {"1"}


def test_a_divergent_shadow_never_answers_and_its_divergence_is_exported(
    mesh: LocalMesh, client: grpcclient.InferenceServerClient
) -> None:
    roll_out(client, baseline="1", shadow=["5"])
    assert index(client)["5"] == ("READY", "shadow")
    answers = [infer(client, f"shadowed-{i}") for i in range(30)]
    assert {version for version, *_ in answers} == {"1"}
    assert all(probability < 0.9 for _, _, probability, _ in answers)  # never the shadow's 0.99
    labels = 'arm="shadow",model="fraud",output="fraud_probability",version="5"'
    wait_until(lambda: router_metric(mesh, "infermesh_shadow_divergence", labels) > 0.3, "the shadow's divergence")
    assert router_metric(mesh, "infermesh_shadow_flips_total", labels) > 0
    compared = 'model="fraud",version="5"'  # every served row, once the last lingering mirror has left
    wait_until(lambda: router_metric(mesh, "infermesh_shadow_compared_rows_total", compared) >= 30, "30 rows compared")


def test_the_cascade_answers_from_the_large_model_only_inside_the_band(
    mesh: LocalMesh, client: grpcclient.InferenceServerClient
) -> None:
    # Seeded users (their features differ) and amounts from small to very large: answers across the range.
    requests = [(user_id(i), 10.0 * 1.3**i) for i in range(40)]
    small = {request: infer(client, request[0], amount=request[1])[2] for request in requests}
    low, high = (float(q) for q in np.quantile(list(small.values()), [0.25, 0.75]))
    roll_out(client, baseline="1", cascade={"model": "fraud_large", "when_output_between": [low, high]})
    inside = outside = 0
    for request in requests:
        _, arm, probability, parameters = infer(client, request[0], amount=request[1])
        if low <= small[request] <= high:
            inside += 1
            large = infer(client, request[0], model="fraud_large", amount=request[1])[2]
            assert (arm, parameters.get("infermesh_answered_by")) == ("cascade", "fraud_large")
            assert probability == pytest.approx(large, abs=1e-6)
        else:
            outside += 1
            assert (arm, "infermesh_answered_by" in parameters) == ("baseline", False)
            assert probability == pytest.approx(small[request], abs=1e-6)
    assert inside >= 10 and outside >= 10
    assert router_metric(mesh, "infermesh_cascades_total", 'model="fraud",outcome="large"') >= inside
