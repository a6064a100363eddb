"""The gateway coalesces concurrent requests into shared router calls; every client still gets exactly its
own answer, flags, id and error, as if it had been alone."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from demo.mesh import LocalMesh
from tests.e2e.meshes import auth, fraud_inputs, metric
from tests.e2e.test_inference import expected_probabilities

CLIENTS = 96


def infer_calls(port: int, service: str, model: str = "fraud") -> float:
    """Inference calls a service served: ModelInfer, and at the router also the gateway's InferBatch."""
    methods = ("ModelInfer", "InferBatch") if service == "router" else ("ModelInfer",)
    return sum(
        metric(port, "infermesh_requests_total", f'method="{method}",model="{model}",service="{service}"')
        for method in methods
    )


async def test_concurrent_requests_share_router_calls_and_keep_their_own_answers(mesh: LocalMesh) -> None:
    gateway_before = infer_calls(mesh.gateway.metrics_port, "gateway")
    router_before = infer_calls(mesh.router.metrics_port, "router")
    # Request i: i % 3 + 1 rows of known entities; every 8th also carries an unknown user (policy default).
    requests = []
    for i in range(CLIENTS):
        rows = i % 3 + 1
        users = [(37 * i + r) % 5000 for r in range(rows)]
        merchants = [(11 * i + r) % 1000 for r in range(rows)]
        amounts = [float(5 + i + r) for r in range(rows)]
        requests.append((users, merchants, amounts, i % 8 == 0))

    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:

        async def one(i: int):
            users, merchants, amounts, unknown = requests[i]
            names = [f"u{u}" for u in users] + (["u999999"] if unknown else [])
            tensors = fraud_inputs(
                names, [f"m{m}" for m in merchants] + (["m1"] if unknown else []), amounts + ([9.0] if unknown else [])
            )
            return await client.infer("fraud", tensors, request_id=f"request-{i}", headers=auth())

        results = await asyncio.gather(*(one(i) for i in range(CLIENTS)))

    for i, result in enumerate(results):
        users, merchants, amounts, unknown = requests[i]
        response = result.get_response()
        assert response.id == f"request-{i}"
        probabilities = result.as_numpy("fraud_probability")
        assert probabilities.shape == (len(users) + unknown,)
        np.testing.assert_allclose(
            probabilities[: len(users)], expected_probabilities(mesh, users, merchants, amounts), rtol=1e-5
        )
        if unknown:
            assert response.parameters["infermesh_defaulted_entities"].string_param == "user_id=u999999"
        else:
            assert "infermesh_defaulted_entities" not in response.parameters
    gateway_calls = infer_calls(mesh.gateway.metrics_port, "gateway") - gateway_before
    router_calls = infer_calls(mesh.router.metrics_port, "router") - router_before
    assert gateway_calls == CLIENTS
    assert router_calls < CLIENTS, "concurrent requests should have shared router calls"


async def test_one_failing_request_does_not_fail_the_others_in_its_batch(mesh: LocalMesh) -> None:
    """fraud_strict rejects unknown entities: only the requests naming one fail, each with its own entity."""
    router_before = infer_calls(mesh.router.metrics_port, "router", "fraud_strict")
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:

        async def one(i: int):
            user = f"u9{i:05d}9" if i % 4 == 0 else f"u{i}"
            return await client.infer("fraud_strict", fraud_inputs([user], [f"m{i}"], [10.0]), headers=auth())

        outcomes = await asyncio.gather(*(one(i) for i in range(64)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 4 == 0:
            assert isinstance(outcome, InferenceServerException), outcome
            assert outcome.status() == "StatusCode.NOT_FOUND"
            assert f"user_id=u9{i:05d}9" in outcome.message()
        else:
            assert not isinstance(outcome, BaseException), outcome
            assert outcome.as_numpy("fraud_probability").shape == (1,)
    assert infer_calls(mesh.router.metrics_port, "router", "fraud_strict") - router_before < 64


def test_router_refuses_malformed_batches(mesh: LocalMesh) -> None:
    """Batches straight to the router's own InferBatch whose segments or data do not fit: INVALID_ARGUMENT
    naming the problem, for the whole batch (a separate process: it needs the mesh's own protobuf modules)."""
    script = [sys.executable, "-m", "tests.e2e.batch_client", mesh.router.address]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(script, check=True, capture_output=True, text=True, timeout=60, cwd=root)
    answers = json.loads(done.stdout)
    assert answers["good"] == {"code": "OK", "segments": [0, 0], "rows": 2}
    for case in ("rows do not add up", "no segments", "zero rows", "short raw input"):
        assert answers[case]["code"] == "INVALID_ARGUMENT", (case, answers[case])
    assert "do not add up to the batch of 2 rows" in answers["rows do not add up"]["details"]
    assert "raw content is 4 bytes" in answers["short raw input"]["details"]
    # A bad segment fails alone: its own status inside an OK answer.
    assert answers["one bad segment"] == {"code": "OK", "segments": [3, 0], "rows": 1}


async def test_typed_and_raw_requests_coalesce_into_the_same_answers(mesh: LocalMesh) -> None:
    """Typed contents are encoded raw when merged; the answers match the model either way."""

    def typed(i: int) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name="fraud", id=f"typed-{i}")
        request.inputs.add(name="user_id", datatype="BYTES", shape=[1]).contents.bytes_contents.append(f"u{i}".encode())
        request.inputs.add(name="merchant_id", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            f"m{i}".encode()
        )
        request.inputs.add(name="amount", datatype="FP32", shape=[1]).contents.fp32_contents.append(float(i))
        return request

    router_before = infer_calls(mesh.router.metrics_port, "router")
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        metadata = list(auth().items())
        typed_answers = asyncio.gather(
            *(client._client_stub.ModelInfer(typed(i), metadata=metadata, timeout=10) for i in range(1, 49))
        )
        raw_answers = asyncio.gather(
            *(
                client.infer("fraud", fraud_inputs([f"u{i}"], [f"m{i}"], [float(i)]), headers=auth())
                for i in range(1, 49)
            )
        )
        typed_results, raw_results = await asyncio.gather(typed_answers, raw_answers)
    expected = expected_probabilities(mesh, list(range(1, 49)), list(range(1, 49)), [float(i) for i in range(1, 49)])
    for i, (typed_result, raw_result) in enumerate(zip(typed_results, raw_results, strict=True)):
        assert typed_result.id == f"typed-{i + 1}"
        typed_value = np.frombuffer(typed_result.raw_output_contents[0], dtype="<f4")
        np.testing.assert_allclose(typed_value, expected[i : i + 1], rtol=1e-5)
        np.testing.assert_allclose(raw_result.as_numpy("fraud_probability"), expected[i : i + 1], rtol=1e-5)
    assert infer_calls(mesh.router.metrics_port, "router") - router_before < 96
