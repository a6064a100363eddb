"""What every service offers besides inference: health, reflection, metrics, the streaming RPC."""

from __future__ import annotations

import queue
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from demo.mesh import LocalMesh
from tests.e2e.meshes import auth, fraud_inputs, metric

EXPECTED_SERVICES = {
    "gateway": "inference.GRPCInferenceService",
    "router": "inference.GRPCInferenceService",
    "model_service_0": "inference.GRPCInferenceService",
    "feature_service": "infermesh.features.v1.FeatureStore",
}


def test_every_service_serves_health_and_reflection(mesh: LocalMesh) -> None:
    for process in mesh.processes():
        with grpc.insecure_channel(process.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, process.name
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                timeout=5,
                metadata=list(auth().items()),  # the gateway's needs a key, like every call but a few (test_abuse)
            )
            services = {s.name for reply in replies for s in reply.list_services_response.service}
        expected = EXPECTED_SERVICES.get(process.name, "inference.GRPCInferenceService")
        assert {expected, "grpc.health.v1.Health"} <= services, (process.name, services)


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_metrics_count_requests_batches_and_feature_lookups(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.infer("fraud", fraud_inputs(["u3", "no-such-user"], ["m3", "m4"], [3.0, 4.0]), headers=auth())
    assert mesh.gateway and mesh.router and mesh.feature_service
    gateway = scrape(mesh.gateway.metrics_port)
    # The version label is the version resolved for the request (the newest), never a client's free text.
    assert (
        'infermesh_requests_total{code="OK",method="ModelInfer",model="fraud",service="gateway",version="1"}' in gateway
    )
    assert "infermesh_request_duration_seconds_bucket" in gateway
    router = scrape(mesh.router.metrics_port)
    assert 'infermesh_batch_size_count{model="fraud",service="router"}' in router
    assert "infermesh_feature_defaults_used_total" in router
    assert "infermesh_replicas_up 2.0" in router
    features = scrape(mesh.feature_service.metrics_port)
    assert 'infermesh_feature_misses_total{view="user"}' in features
    replicas = "".join(scrape(r.metrics_port) for r in mesh.model_services)
    assert 'infermesh_batch_size_count{model="fraud",service="model_service"}' in replicas
    assert "infermesh_forward_seconds_bucket" in replicas


def stream_count(mesh: LocalMesh, code: str) -> float:
    return metric(
        mesh.gateway.metrics_port,
        "infermesh_requests_total",
        f'code="{code}",method="ModelStreamInfer",model="fraud",service="gateway",version="1"',
    )


def test_stream_infer_through_the_gateway(mesh: LocalMesh) -> None:
    """Each message answered on its own; each counted as a request, in requests and latency."""
    ok_before, invalid_before = stream_count(mesh, "OK"), stream_count(mesh, "INVALID_ARGUMENT")
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        for i, user in enumerate(["u1", "u2"]):
            client.async_stream_infer("fraud", fraud_inputs([user], ["m1"], [10.0]), request_id=str(i))
        bad = grpcclient.InferInput("amount", [1], "FP32")
        bad.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        client.async_stream_infer("fraud", [bad], request_id="bad")
        answers = [results.get(timeout=10) for _ in range(3)]
    finally:
        client.stop_stream()
    good = [r for r, e in answers if e is None]
    errors = [e for r, e in answers if e is not None]
    assert sorted(r.get_response().id for r in good) == ["0", "1"]
    assert all(r.as_numpy("fraud_probability").shape == (1,) for r in good)
    assert len(errors) == 1 and "input 'user_id' is missing" in str(errors[0])
    assert stream_count(mesh, "OK") - ok_before == 2
    assert stream_count(mesh, "INVALID_ARGUMENT") - invalid_before == 1
    latency = metric(mesh.gateway.metrics_port, "infermesh_request_duration_seconds_count", 'method="ModelStreamInfer"')
    assert latency >= 3


def test_a_stream_flags_each_answer_as_its_request_s_final_one(mesh: LocalMesh) -> None:
    """Triton's `triton_final_response`: streaming clients (enable_empty_final_response or not) read it to know a
    request is done and wait for it; every answer here is its request's only one, errors included."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        client.async_stream_infer("fraud", fraud_inputs(["u1"], ["m1"], [10.0]), request_id="plain")
        client.async_stream_infer(
            "fraud", fraud_inputs(["u2"], ["m1"], [10.0]), request_id="opted", enable_empty_final_response=True
        )
        answers = [results.get(timeout=10) for _ in range(2)]
    finally:
        client.stop_stream()
    by_id = {result.get_response().id: result.get_response() for result, error in answers if error is None}
    assert set(by_id) == {"plain", "opted"}
    for response in by_id.values():
        assert response.parameters["triton_final_response"].bool_param is True
        assert response.outputs[0].name == "fraud_probability"


def test_a_bad_class_count_fails_its_own_stream_message_and_the_stream_goes_on(mesh: LocalMesh) -> None:
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        bad = [grpcclient.InferRequestedOutput("fraud_probability", class_count=-1)]
        client.async_stream_infer("fraud", fraud_inputs(["u1"], ["m1"], [10.0]), outputs=bad, request_id="bad")
        top = [grpcclient.InferRequestedOutput("fraud_probability", class_count=1)]
        client.async_stream_infer("fraud", fraud_inputs(["u2"], ["m1"], [10.0]), outputs=top, request_id="good")
        (_, error), (result, no_error) = [results.get(timeout=10) for _ in range(2)]
    finally:
        client.stop_stream()
    assert error is not None and "classification must be a positive integer" in str(error)
    assert no_error is None and result.get_response().id == "good"
    assert result.as_numpy("fraud_probability")[0][0].decode().endswith(":0")


def test_malformed_messages_are_invalid_argument_everywhere(mesh: LocalMesh) -> None:
    methods = {
        "feature_service": "/infermesh.features.v1.FeatureStore/BatchReadFeatures",
    }
    for process in mesh.processes():
        method = methods.get(process.name, "/inference.GRPCInferenceService/ModelInfer")
        with grpc.insecure_channel(process.address) as channel:
            call = channel.unary_unary(method)
            try:
                call(b"\x0a\xff\xff\xff\xff\x0f", timeout=5, metadata=list(auth().items()))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, process.name
                assert "malformed request" in error.details()
                assert "DecodeError" not in error.details()
            else:
                raise AssertionError(f"{process.name} accepted a malformed message")
