"""End to end through the gateway with the stock Triton clients: metadata, inference, every bad input; each
check on the plaintext mesh and again with TLS on every hop."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from demo import synthetic
from demo.mesh import LocalMesh
from tests.e2e.meshes import ALL_MODELS_KEY, DEMO_KEY, LIMITED_KEY, auth, fraud_inputs


@pytest.fixture(scope="module", params=["plaintext", "tls", "unary"])
def mesh(request: pytest.FixtureRequest, mesh: LocalMesh) -> LocalMesh:
    """Every test here runs on the plaintext mesh, on the mesh with TLS on every hop (conftest's tls_mesh), and on
    the mesh whose internal calls are unary gRPC calls instead of hop-stream messages (conftest's unary_mesh)."""
    if request.param == "plaintext":
        return mesh
    return request.getfixturevalue("tls_mesh" if request.param == "tls" else "unary_mesh")


def tls_of(mesh: LocalMesh) -> dict[str, Any]:
    """tritonclient's TLS arguments for the mesh: the development CA as the root to trust (none in plaintext)."""
    return {"ssl": True, "root_certificates": str(mesh.ca_file)} if mesh.ca_file is not None else {}


@pytest.fixture(scope="module")
def client(mesh: LocalMesh) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(mesh.gateway_address, **tls_of(mesh))


def expected_probabilities(mesh: LocalMesh, users: list[int], merchants: list[int], amounts: list[float]):
    """What the TorchScript model gives for the same rows joined locally from the synthetic world."""
    world = synthetic.make_world()
    rows = synthetic.feature_matrix(world, np.array(users), np.array(merchants), np.array(amounts, np.float32))
    model = torch.jit.load(str(mesh.repository / "fraud" / "1" / "model.pt"))
    with torch.inference_mode():
        return model(torch.from_numpy(rows)).reshape(-1).numpy()


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status()


def test_server_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud", headers=auth())
    metadata = client.get_server_metadata()
    assert metadata.name == "infermesh"
    model = client.get_model_metadata("fraud", headers=auth(), as_json=True)
    assert model["name"] == "fraud"
    assert model["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("user_id", "BYTES", ["-1"]),
        ("merchant_id", "BYTES", ["-1"]),
        ("amount", "FP32", ["-1"]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["outputs"]] == [("fraud_probability", "FP32", ["-1"])]


def test_single_and_batched_inference_match_the_model(mesh: LocalMesh, client) -> None:
    single = client.infer("fraud", fraud_inputs(["u42"], ["m7"], [129.99]), headers=auth())
    assert single.get_response().model_version == "1"
    np.testing.assert_allclose(
        single.as_numpy("fraud_probability"), expected_probabilities(mesh, [42], [7], [129.99]), rtol=1e-5
    )
    users, merchants = list(range(0, 5000, 97)), list(range(0, 1000, 19))[:52]
    amounts = [float(a) for a in np.linspace(1, 900, len(users))]
    batch = client.infer(
        "fraud",
        fraud_inputs([f"u{u}" for u in users], [f"m{m}" for m in merchants], amounts),
        headers=auth(),
    )
    probabilities = batch.as_numpy("fraud_probability")
    assert probabilities.shape == (len(users),)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    np.testing.assert_allclose(probabilities, expected_probabilities(mesh, users, merchants, amounts), rtol=1e-5)


def test_fraud_like_rows_score_higher(client) -> None:
    world = synthetic.make_world()
    risky_user = int(np.argmax(world.user_risk))
    safe_user = int(np.argmin(world.user_risk + (world.users[:, 4] > 0.05)))
    risky_merchant, safe_merchant = int(np.argmax(world.merchant_risk)), int(np.argmin(world.merchant_risk))
    usual = float(world.users[risky_user, 2])
    result = client.infer(
        "fraud",
        fraud_inputs(
            [f"u{risky_user}", f"u{safe_user}"],
            [f"m{risky_merchant}", f"m{safe_merchant}"],
            [usual * 10, float(world.users[safe_user, 2])],
        ),
        headers=auth(),
    )
    risky, safe = result.as_numpy("fraud_probability")
    assert risky > 0.5 > safe


def test_triton_s_classification_extension_answers_classes(mesh: LocalMesh, client) -> None:
    """tritonclient's `class_count`: each row's top classes as "<value>:<index>" strings instead of the values."""
    assert "classification" in client.get_server_metadata().extensions
    inputs = fraud_inputs(["u1", "u2"], ["m1", "m2"], [10.0, 20.0])
    outputs = [grpcclient.InferRequestedOutput("fraud_probability", class_count=1)]
    result = client.infer("fraud", inputs, outputs=outputs, headers=auth())
    classes = result.as_numpy("fraud_probability")
    assert classes.shape == (2, 1)
    expected = expected_probabilities(mesh, [1, 2], [1, 2], [10.0, 20.0])
    for row, probability in zip(classes[:, 0], expected, strict=True):
        value, index = row.decode().split(":")
        assert index == "0" and float(value) == pytest.approx(probability, abs=1e-6)
    with pytest.raises(InferenceServerException, match="classification must be a positive integer"):
        client.infer(
            "fraud",
            inputs,
            outputs=[grpcclient.InferRequestedOutput("fraud_probability", class_count=-2)],
            headers=auth(),
        )


def test_typed_contents_give_the_same_answer(mesh: LocalMesh, client) -> None:
    request = service_pb2.ModelInferRequest(model_name="fraud")
    user = request.inputs.add(name="user_id", datatype="BYTES", shape=[2])
    user.contents.bytes_contents.extend([b"u1", b"u2"])
    merchant = request.inputs.add(name="merchant_id", datatype="BYTES", shape=[2])
    merchant.contents.bytes_contents.extend([b"m1", b"m2"])
    amount = request.inputs.add(name="amount", datatype="FP32", shape=[2])
    amount.contents.fp32_contents.extend([10.0, 20.0])
    response = client._client_stub.ModelInfer(request, metadata=list(auth().items()), timeout=5)
    assert response.outputs[0].name == "fraud_probability"
    values = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(values, expected_probabilities(mesh, [1, 2], [1, 2], [10.0, 20.0]), rtol=1e-5)


def test_unknown_entity_default_policy_says_so(client) -> None:
    result = client.infer("fraud", fraud_inputs(["u1", "u999999"], ["m1", "m1"], [5.0, 5.0]), headers=auth())
    assert result.as_numpy("fraud_probability").shape == (2,)
    parameters = result.get_response().parameters
    assert parameters["infermesh_defaulted_entities"].string_param == "user_id=u999999"


def test_unknown_entity_reject_policy_names_entity(client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("fraud_strict", fraud_inputs(["u1", "u999999"], ["m1", "m1"], [5.0, 5.0]), headers=auth())
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "user_id=u999999" in caught.value.message()
    ok = client.infer("fraud_strict", fraud_inputs(["u1"], ["m1"], [5.0]), headers=auth())
    assert ok.as_numpy("fraud_probability").shape == (1,)


def test_unknown_model_is_not_found_only_for_a_tenant_that_may_see_it(client) -> None:
    every = auth(ALL_MODELS_KEY)
    status = status_of(lambda: client.infer("nope", fraud_inputs(["u1"], ["m1"], [1.0]), headers=every))
    assert status == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.get_model_metadata("nope", headers=every)) == "StatusCode.NOT_FOUND"
    # A tenant with a list of models learns nothing about other names: PERMISSION_DENIED, existing or not.
    for model in ("nope", "fraud"):
        denied = status_of(lambda m=model: client.get_model_metadata(m, headers=auth(LIMITED_KEY)))
        assert denied == "StatusCode.PERMISSION_DENIED"


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer not-a-key"}, {"authorization": DEMO_KEY}])
def test_missing_or_wrong_key_is_unauthenticated(client, headers) -> None:
    status = status_of(lambda: client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=headers))
    assert status == "StatusCode.UNAUTHENTICATED"


def test_disallowed_model_is_permission_denied(client) -> None:
    status = status_of(lambda: client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth(LIMITED_KEY)))
    assert status == "StatusCode.PERMISSION_DENIED"


def invalid(client, inputs) -> str:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("fraud", inputs, headers=auth())
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    return caught.value.message()


def test_wrong_dtype_names_tensor(client) -> None:
    inputs = fraud_inputs(["u1"], ["m1"], [1.0])
    inputs[2] = grpcclient.InferInput("amount", [1], "FP64")
    inputs[2].set_data_from_numpy(np.array([1.0]))
    assert "input 'amount': datatype FP64 does not match FP32" in invalid(client, inputs)


def test_wrong_shape_names_tensor(client) -> None:
    inputs = fraud_inputs(["u1"], ["m1"], [1.0])
    inputs[2] = grpcclient.InferInput("amount", [1, 1], "FP32")
    inputs[2].set_data_from_numpy(np.array([[1.0]], np.float32))
    assert "input 'amount': shape [1, 1] does not match [-1]" in invalid(client, inputs)


def test_raw_length_mismatch_names_tensor(client) -> None:
    request = service_pb2.ModelInferRequest(model_name="fraud")
    for name, datatype in (("user_id", "BYTES"), ("merchant_id", "BYTES"), ("amount", "FP32")):
        request.inputs.add(name=name, datatype=datatype, shape=[2])
    two_ids = b"\x02\x00\x00\x00u1\x02\x00\x00\x00u2"
    request.raw_input_contents.extend([two_ids, two_ids, b"\x00" * 5])  # amount needs 8 bytes
    with pytest.raises(grpc.RpcError) as caught:
        client._client_stub.ModelInfer(request, metadata=list(auth().items()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'amount': raw content is 5 bytes, expected 8" in caught.value.details()


def test_oversized_batch_is_refused(client) -> None:
    n = 1025
    message = invalid(client, fraud_inputs(["u1"] * n, ["m1"] * n, [1.0] * n))
    assert "batch size 1025 exceeds the max_batch_size 1024" in message


def test_missing_input_and_mismatched_batch(client) -> None:
    assert "input 'amount' is missing" in invalid(client, fraud_inputs(["u1"], ["m1"], [1.0])[:2])
    assert "batch size 2 differs" in invalid(client, fraud_inputs(["u1"], ["m1"], [1.0, 2.0]))


def test_expired_deadline(client) -> None:
    status = status_of(
        lambda: client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth(), client_timeout=0.0001)
    )
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    # and the mesh is fine afterwards
    assert client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth()).as_numpy("fraud_probability").size


async def test_aio_client_concurrent_requests(mesh: LocalMesh) -> None:
    import asyncio

    async with aioclient.InferenceServerClient(mesh.gateway_address, **tls_of(mesh)) as client:
        results = await asyncio.gather(
            *(
                client.infer("fraud", fraud_inputs([f"u{i}"], [f"m{i % 1000}"], [float(i)]), headers=auth())
                for i in range(64)
            )
        )
    assert all(r.as_numpy("fraud_probability").shape == (1,) for r in results)


def test_oversized_message_is_refused_by_size(client) -> None:
    n = 1000
    inputs = fraud_inputs(["u" + "9" * 20_000] * n, ["m1"] * n, [1.0] * n)  # ~20 MB, over the 16 MiB limit
    status = status_of(lambda: client.infer("fraud", inputs, headers=auth()))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"


def test_model_config_for_perf_analyzer(client) -> None:
    config = client.get_model_config("fraud", headers=auth(), as_json=True)["config"]
    assert config["name"] == "fraud"
    assert config["max_batch_size"] == 1024
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [
        ("user_id", "TYPE_STRING"),
        ("merchant_id", "TYPE_STRING"),
        ("amount", "TYPE_FP32"),
    ]
    assert config["output"][0]["name"] == "fraud_probability"
    assert (
        status_of(lambda: client.get_model_config("fraud", headers=auth(LIMITED_KEY))) == "StatusCode.PERMISSION_DENIED"
    )


def test_triton_s_priority_and_timeout_parameters_are_taken_and_checked(client) -> None:
    inputs = fraud_inputs(["u1"], ["m1"], [10.0])
    result = client.infer("fraud", inputs, headers=auth(), priority=1, timeout=5_000_000)
    assert result.as_numpy("fraud_probability").shape == (1,)
    request = service_pb2.ModelInferRequest(model_name="fraud")  # tritonclient itself only sends integers
    request.parameters["priority"].string_param = "urgent"
    for name, datatype in (("user_id", "BYTES"), ("merchant_id", "BYTES"), ("amount", "FP32")):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
    request.raw_input_contents.extend([b"\x02\x00\x00\x00u2", b"\x02\x00\x00\x00m1", b"\x00\x00\x80\x3f"])
    with pytest.raises(grpc.RpcError) as caught:
        client._client_stub.ModelInfer(request, metadata=list(auth().items()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'priority' must be a non-negative integer" in caught.value.details()
