"""The real model service process, called with tritonclient (sync and aio) as any OIP client would.

This module must not import infermesh.proto.inference_pb2 (or model_service.servicer/server): tritonclient
registers the same message names in protobuf's default descriptor pool.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from demo.processes import ServiceProcess
from demo.synthetic import feature_matrix, make_world, sample_transactions
from demo.train import fraud_config
from tests.model_service.models import copy_model

SLOW_DELAY_MS = 1500.0


def start_service(run_dir: Path, repo: Path, **settings: object) -> ServiceProcess:
    process = ServiceProcess(
        "model_service", "model_service", run_dir, {"model_repository": repo, "torch_threads": 1, **settings}
    )
    return process.launch()


@pytest.fixture(scope="module")
def service(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = start_service(tmp_path_factory.mktemp("model_service"), demo_repo, replica_id="replica-a")
    yield process
    process.stop()


def slow_repo(demo_repo: Path, target: Path) -> Path:
    """`fraud` with a one-request queue and no batching window: easy to fill behind a slow forward pass."""
    config = fraud_config()
    config["dynamic_batching"] = {"max_queue_delay_us": 0, "max_queue_size": 1}
    repo = target / "repo"
    copy_model(demo_repo, "fraud", repo, config)
    return repo


@pytest.fixture(scope="module")
def slow_service(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    run_dir = tmp_path_factory.mktemp("slow_model_service")
    process = start_service(run_dir, slow_repo(demo_repo, run_dir), inject_delay_ms=SLOW_DELAY_MS)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def transactions() -> np.ndarray:
    world = make_world()
    sample = sample_transactions(world, 64, seed=7)
    return feature_matrix(world, sample.user_index, sample.merchant_index, sample.amount)


def local_model(repo: Path, name: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(repo / name / "1" / "model.pt"), map_location="cpu")


def features_input(array: np.ndarray, datatype: str = "FP32", name: str = "features") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def metric(process: ServiceProcess, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5).read().decode()
    pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    return sum(float(value) for found, value in pattern.findall(text) if labels in found)


def inflight(process: ServiceProcess) -> float:
    return metric(process, "infermesh_inflight_requests", 'service="model_service"')


def test_health_and_metadata(service: ServiceProcess) -> None:
    with grpcclient.InferenceServerClient(service.address) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("fraud") and client.is_model_ready("bench_mlp", "1")
        assert not client.is_model_ready("nope") and not client.is_model_ready("fraud", "9")
        server = client.get_server_metadata()
        assert server.name == "infermesh-model-service" and server.version
        metadata = client.get_model_metadata("fraud")
        assert metadata.versions == ["1"] and metadata.platform == "pytorch_torchscript"
        # The served signature: the router joins user/merchant features into `features`.
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("features", "FP32", [-1, 13])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("fraud_probability", "FP32", [-1])]
        index = client.get_model_repository_index()
        assert {(m.name, m.version, m.state) for m in index.models} == {
            ("fraud", "1", "READY"),
            ("bench_mlp", "1", "READY"),
        }
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("nope")
        assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_infer_raw_matches_the_local_torchscript_model(
    service: ServiceProcess, demo_repo: Path, transactions: np.ndarray
) -> None:
    with grpcclient.InferenceServerClient(service.address) as client:
        result = client.infer("fraud", [features_input(transactions)], request_id="req-42")
    probability = result.as_numpy("fraud_probability")
    response = result.get_response()
    assert response.id == "req-42" and response.model_version == "1"
    assert response.parameters["replica_id"].string_param == "replica-a"
    assert probability.shape == (64,) and probability.dtype == np.float32
    assert ((probability >= 0) & (probability <= 1)).all() and probability.std() > 0.01
    expected = local_model(demo_repo, "fraud")(torch.from_numpy(transactions)).detach().numpy().reshape(-1)
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-7)


def test_server_metadata_names_the_replica(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ServerMetadata.with_call(service_pb2.ServerMetadataRequest(), timeout=10)
    assert response.name == "infermesh-model-service"
    assert ("infermesh-replica-id", "replica-a") in tuple(call.initial_metadata())


def test_infer_typed_contents(service: ServiceProcess, demo_repo: Path, transactions: np.ndarray) -> None:
    rows = transactions[:3]
    request = service_pb2.ModelInferRequest(model_name="fraud", id="typed")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=[3, 13])
    tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    with grpc.insecure_channel(service.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert response.id == "typed"
    [output] = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("fraud_probability", "FP32", [3])
    probability = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    expected = local_model(demo_repo, "fraud")(torch.from_numpy(rows)).detach().numpy().reshape(-1)
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-7)


def test_requested_outputs(service: ServiceProcess, transactions: np.ndarray) -> None:
    with grpcclient.InferenceServerClient(service.address) as client:
        wanted = [grpcclient.InferRequestedOutput("fraud_probability")]
        result = client.infer("fraud", [features_input(transactions[:2])], outputs=wanted)
        assert result.as_numpy("fraud_probability").shape == (2,)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("fraud", [features_input(transactions[:2])], outputs=[grpcclient.InferRequestedOutput("x")])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "requested output 'x' is not an output of model 'fraud'" in caught.value.message()


@pytest.mark.parametrize(
    ("array", "datatype", "message"),
    [
        pytest.param(np.zeros((2, 13), np.float64), "FP64", "input 'features': datatype FP64", id="dtype"),
        pytest.param(
            np.zeros((2, 12), np.float32), "FP32", "input 'features': shape [2, 12] does not match [-1, 13]", id="width"
        ),
        pytest.param(
            np.zeros(13, np.float32), "FP32", "input 'features': shape [13] does not match [-1, 13]", id="rank"
        ),
        pytest.param(
            np.zeros((1024 * 16 + 1, 13), np.float32),
            "FP32",
            "batch size 16385 exceeds the max_batch_size 1024",
            id="oversized",
        ),
    ],
)
def test_invalid_requests_are_invalid_argument(
    service: ServiceProcess, array: np.ndarray, datatype: str, message: str
) -> None:
    with grpcclient.InferenceServerClient(service.address) as client, pytest.raises(InferenceServerException) as caught:
        client.infer("fraud", [features_input(array, datatype)])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in caught.value.message()


def test_unknown_model_or_version_is_not_found(service: ServiceProcess, transactions: np.ndarray) -> None:
    with grpcclient.InferenceServerClient(service.address) as client:
        for model, version, message in [("nope", "", "model 'nope' not found"), ("fraud", "9", "no version '9'")]:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(model, [features_input(transactions[:1])], model_version=version)
            assert caught.value.status() == "StatusCode.NOT_FOUND"
            assert message in caught.value.message()


def test_stream_infer_answers_each_request(service: ServiceProcess, transactions: np.ndarray) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    with grpcclient.InferenceServerClient(service.address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("fraud", [features_input(transactions[:2])], request_id="good")
        client.async_stream_infer("fraud", [features_input(np.zeros((1, 12), np.float32))], request_id="bad")
        first, second = answers.get(timeout=10), answers.get(timeout=10)
        client.stop_stream()
    result, error = first
    assert error is None and result.as_numpy("fraud_probability").shape == (2,)  # type: ignore[attr-defined]
    assert second[0] is None and "shape [1, 12] does not match [-1, 13]" in str(second[1])


async def test_aio_concurrent_requests_are_batched(service: ServiceProcess, demo_repo: Path) -> None:
    inputs = np.random.default_rng(3).standard_normal((32, 256), dtype=np.float32)
    labels = 'model="bench_mlp"'
    batches_before = metric(service, "infermesh_batch_size_count", labels)
    rows_before = metric(service, "infermesh_batch_size_sum", labels)
    async with aioclient.InferenceServerClient(service.address) as client:
        metadata = await client.get_model_metadata("bench_mlp")
        assert [t.name for t in metadata.inputs] == ["x"]

        async def one(row: int) -> np.ndarray:
            tensor = aioclient.InferInput("x", [1, 256], "FP32")
            tensor.set_data_from_numpy(inputs[row : row + 1])
            result = await client.infer("bench_mlp", [tensor])
            return result.as_numpy("y")

        outputs = await asyncio.gather(*(one(row) for row in range(32)))
    expected = local_model(demo_repo, "bench_mlp")(torch.from_numpy(inputs)).detach().numpy()
    np.testing.assert_allclose(np.concatenate(outputs), expected, rtol=1e-4, atol=1e-5)
    assert metric(service, "infermesh_batch_size_sum", labels) - rows_before == 32
    assert metric(service, "infermesh_batch_size_count", labels) - batches_before < 32  # requests shared batches


async def test_full_queue_is_refused_at_once(slow_service: ServiceProcess, transactions: np.ndarray) -> None:
    async with aioclient.InferenceServerClient(slow_service.address) as client:

        async def timed() -> tuple[float, object]:
            tensor = aioclient.InferInput("features", [1, 13], "FP32")
            tensor.set_data_from_numpy(transactions[:1])
            started = time.monotonic()
            try:
                outcome: object = await client.infer("fraud", [tensor], client_timeout=30)
            except InferenceServerException as error:
                outcome = error
            return time.monotonic() - started, outcome

        # Queue of one + one request computing for 1.5 s: of 6 concurrent requests at least 4 cannot fit.
        outcomes = await asyncio.gather(*(timed() for _ in range(6)))
    served = [elapsed for elapsed, outcome in outcomes if not isinstance(outcome, InferenceServerException)]
    refused = [(elapsed, outcome) for elapsed, outcome in outcomes if isinstance(outcome, InferenceServerException)]
    assert 1 <= len(served) <= 2 and len(refused) >= 4
    assert min(served) >= SLOW_DELAY_MS / 1000  # the injected delay really held the queue
    for elapsed, error in refused:
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "model 'fraud' queue is full" in error.message()
        assert elapsed < SLOW_DELAY_MS / 1000 / 3  # refused at once, not after waiting for the slow batch


async def test_sigterm_drains_in_flight_requests(demo_repo: Path, tmp_path: Path, transactions: np.ndarray) -> None:
    process = start_service(tmp_path, slow_repo(demo_repo, tmp_path), inject_delay_ms=SLOW_DELAY_MS)
    try:
        async with aioclient.InferenceServerClient(process.address) as client:
            tensor = aioclient.InferInput("features", [2, 13], "FP32")
            tensor.set_data_from_numpy(transactions[:2])
            pending = asyncio.create_task(client.infer("fraud", [tensor], client_timeout=30))
            # Wait until the request is being served; another process's metric has no event to await.
            while await asyncio.to_thread(inflight, process) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert process.process is not None
            process.process.send_signal(signal.SIGTERM)
            result = await pending
            assert result.as_numpy("fraud_probability").shape == (2,)
        exit_code = await asyncio.to_thread(process.process.wait, 20)
        assert exit_code == 0
        assert json.loads(process.port_file.read_text())["port"] == process.port
    finally:
        process.kill()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_a_replica_told_to_use_a_missing_gpu_fails_at_start(tmp_path: Path, demo_repo: Path) -> None:
    """Rather than starting, loading no model and looking alive."""
    with pytest.raises(RuntimeError, match="exited") as caught:
        start_service(tmp_path, demo_repo, device="cuda")
    assert "no CUDA device here" in str(caught.value)
