"""Label feedback end to end: requests through the gateway with ids, logged by the router with the tenant the gateway
authenticated, then labels through `infermesh.feedback.v1.Feedback/ReportLabels` (sent from a process of its own:
bench.replay's `labels` mode), refused for unknown and foreign ids, and online accuracy as computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import tritonclient.grpc as grpcclient

from demo.mesh import LocalMesh
from tests.e2e.meshes import (
    ALL_MODELS_KEY,
    DEMO_KEY,
    auth,
    fraud_inputs,
    metric,
    repository_with_strict_variant,
    start_mesh,
)

ROOT = Path(__file__).resolve().parents[2]
TRANSACTIONS = [("u1", "m1", 25.0), ("u2", "m2", 900.0), ("u3", "m3", 3000.0), ("u4", "m1", 12.0), ("u5", "m4", 80.0)]
LABELS = [1.0, 0.0, 1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    run_dir = tmp_path_factory.mktemp("feedback")
    repository = repository_with_strict_variant(demo_dir, run_dir, monitoring={"log_sample_rate": 1.0})
    running = start_mesh(
        demo_dir, run_dir, model_repository=repository, replicas=1, prediction_log=True,
        gateway={"online_min_labels": 1},
    )  # fmt: skip
    yield running
    running.stop()


def report(mesh: LocalMesh, key: str, labels: list[tuple[str, float, int]]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.replay", "labels", "--gateway", mesh.gateway_address, "--api-key", key,
         "--labels", json.dumps(labels)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_labels_of_the_tenants_own_requests_give_the_online_accuracy_computed_by_hand(mesh: LocalMesh) -> None:
    scores = []
    with grpcclient.InferenceServerClient(mesh.gateway_address) as client:
        for index, (user, merchant, amount) in enumerate(TRANSACTIONS):
            result = client.infer(
                "fraud", fraud_inputs([user], [merchant], [amount]), headers=auth(), request_id=f"fb-{index}"
            )
            scores.append(float(result.as_numpy("fraud_probability")[0]))
    admin = redis.Redis.from_url(mesh.redis_url)
    deadline = time.monotonic() + 10
    while admin.exists(*(f"infermesh:predictions:request:fb-{i}" for i in range(5))) < 5:
        assert time.monotonic() < deadline, "the router did not index its logged predictions"
        time.sleep(0.05)  # the log is written off the request path
    record = admin.hgetall("infermesh:predictions:request:fb-0")
    assert record[b"tenant"] == b"demo"  # as the gateway authenticated it, not as any client said

    foreign = report(mesh, ALL_MODELS_KEY, [("fb-0", 1.0, 0)])  # tenant "ops" may use fraud, but fb-0 is demo's
    assert foreign["code"] == "PERMISSION_DENIED" and "fb-0" in foreign["details"]
    unknown = report(mesh, DEMO_KEY, [("never-sent", 1.0, 0)])
    assert unknown["code"] == "NOT_FOUND" and "never-sent" in unknown["details"]

    now_ms = int(time.time() * 1000)
    answer = report(mesh, DEMO_KEY, [(f"fb-{i}", label, now_ms + 60_000) for i, label in enumerate(LABELS)])
    assert answer["code"] == "OK" and answer["joined"] == 5
    assert {(r["model"], r["version"]) for r in answer["results"]} == {("fraud", "1")}
    right = sum((score >= 0.5) == (label == 1.0) for score, label in zip(scores, LABELS, strict=True))
    assert mesh.gateway is not None
    port = mesh.gateway.metrics_port
    assert metric(port, "infermesh_online_accuracy", 'model="fraud",version="1"') == pytest.approx(right / 5)
    brier = sum((score - label) ** 2 for score, label in zip(scores, LABELS, strict=True)) / 5
    assert metric(port, "infermesh_online_brier_score", 'model="fraud",version="1"') == pytest.approx(brier, rel=1e-4)
    assert metric(port, "infermesh_label_delay_seconds_count", 'model="fraud",version="1"') == 5
    assert metric(port, "infermesh_label_delay_seconds_bucket", 'le="10.0",model="fraud",version="1"') == 0  # ~60 s

    again = report(mesh, DEMO_KEY, [("fb-0", 1.0, 0)])
    assert again["code"] == "OK" and again["joined"] == 0 and again["results"][0]["code"] == 6  # ALREADY_EXISTS
    assert metric(port, "infermesh_online_labels", 'model="fraud",version="1"') == 5
