"""Knowing when the model is wrong, end to end through the gateway: drift of served traffic against the version's
training profile, and the sampled prediction log in a Redis Stream."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient

from demo.mesh import LocalMesh
from demo.redis_server import RedisServer
from demo.synthetic import make_world, merchant_id, sample_transactions, user_id
from demo.train import FEATURE_NAMES
from tests.e2e.meshes import auth, fraud_inputs, metric, repository_with_strict_variant, start_mesh

LOG_STREAM = "test:predictions"
LOG_MAX_LEN = 300
ROWS_PER_REQUEST = 50


@pytest.fixture(scope="module")
def mesh(demo_dir: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    run_dir = tmp_path_factory.mktemp("quality")
    key_file = run_dir / "hash.key"
    key_file.write_text("test-prediction-log-key-0123456789")
    repository = repository_with_strict_variant(demo_dir, run_dir, monitoring={"log_sample_rate": 0.5})
    running = start_mesh(
        demo_dir,
        run_dir,
        model_repository=repository,
        router={
            "drift_window_s": 600,
            "drift_slots": 4,
            "drift_min_rows": 500,
            "drift_export_interval_s": 0,
            "prediction_log_redis_url": redis_server.url,
            "prediction_log_hash_key_file": key_file,
            "prediction_log_stream": LOG_STREAM,
            "prediction_log_max_len": LOG_MAX_LEN,
        },
    )
    yield running
    running.stop()


def send(client: grpcclient.InferenceServerClient, amount_scale: float, requests: int, seed: int) -> list[str]:
    """Transactions as the model was trained on (amounts times `amount_scale`); returns the request ids."""
    sample = sample_transactions(make_world(), requests * ROWS_PER_REQUEST, seed=seed)
    ids = []
    for start in range(0, requests * ROWS_PER_REQUEST, ROWS_PER_REQUEST):
        rows = slice(start, start + ROWS_PER_REQUEST)
        users = [user_id(int(i)) for i in sample.user_index[rows]]
        merchants = [merchant_id(int(i)) for i in sample.merchant_index[rows]]
        amounts = (sample.amount[rows] * amount_scale).tolist()
        request_id = f"quality-{seed}-{start}"
        client.infer("fraud", fraud_inputs(users, merchants, amounts), headers=auth(), request_id=request_id)
        ids.append(request_id)
    return ids


def drift(mesh: LocalMesh) -> dict[str, float]:
    assert mesh.router is not None
    port = mesh.router.metrics_port
    psi = {name: metric(port, "infermesh_feature_drift_psi", f'feature="{name}"') for name in FEATURE_NAMES}
    psi["prediction"] = metric(port, "infermesh_prediction_drift_psi", 'model="fraud",version="1"')
    return psi


def test_shifted_amounts_raise_the_psi_of_amount_alone_and_the_log_holds_sampled_hashed_records(
    mesh: LocalMesh, redis_server: RedisServer
) -> None:
    with grpcclient.InferenceServerClient(mesh.gateway_address) as client:
        sent = send(client, 1.0, 12, seed=7)  # 600 rows like the training data's
        unshifted = drift(mesh)
        assert max(unshifted.values()) < 0.1, unshifted
        sent += send(client, 20.0, 30, seed=8)  # then amounts 20 times larger: most of the window
    shifted = drift(mesh)
    assert shifted["amount"] > 0.25, shifted
    assert all(psi < 0.1 for name, psi in shifted.items() if name not in ("amount", "prediction")), shifted
    admin = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 10
    while admin.xlen(LOG_STREAM) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)  # the log is written off the request path
    entries = admin.xrange(LOG_STREAM)
    assert 0 < len(entries) < len(sent)  # sampled: about half of the requests
    assert len(entries) <= LOG_MAX_LEN
    for _, fields in entries:
        record = {k.decode(): v.decode() for k, v in fields.items()}
        assert record["id"] in sent and record["model"] == "fraud" and record["version"] == "1"
        features = np.array(json.loads(record["features"]))
        assert features.shape == (ROWS_PER_REQUEST, len(FEATURE_NAMES))
        users = json.loads(record["entities"])["user_id"]
        assert len(users) == ROWS_PER_REQUEST and all(re.fullmatch("[0-9a-f]{32}", h) for h in users)
        assert "inputs" not in record  # no raw inputs without the model's opt-in
        assert not any(re.search(rb'"[um][0-9]+"', value) for value in fields.values())  # no entity id in clear
