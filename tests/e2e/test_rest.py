"""The gateway's HTTP/REST front (KServe v2 REST, Triton's HTTP API) on a real mesh: the same answers as over
gRPC, JSON and Triton's binary tensor extension, and every refusal as the protocol's `{"error": ...}` with its
HTTP status, decided before the body is read where the headers suffice."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient

from demo.mesh import LocalMesh
from tests.e2e.meshes import ADMIN_KEY, ALL_MODELS_KEY, FLOOD_KEY, LIMITED_KEY, auth, fraud_inputs, metric


def base_url(mesh: LocalMesh, scheme: str = "http") -> str:
    assert mesh.gateway is not None and mesh.gateway.http_port > 0
    return f"{scheme}://127.0.0.1:{mesh.gateway.http_port}"


def fraud_json(users: list[str], merchants: list[str], amounts: list[float], **fields: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "user_id", "datatype": "BYTES", "shape": [len(users)], "data": users},
            {"name": "merchant_id", "datatype": "BYTES", "shape": [len(merchants)], "data": merchants},
            {"name": "amount", "datatype": "FP32", "shape": [len(amounts)], "data": amounts},
        ],
        **fields,
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def grpc_probabilities(mesh: LocalMesh, users: list[str], merchants: list[str], amounts: list[float]) -> Any:
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        result = await client.infer("fraud", fraud_inputs(users, merchants, amounts), headers=auth())
    return result.as_numpy("fraud_probability")


async def test_json_inference_answers_as_grpc_does(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    users, merchants, amounts = ["u1", "u2"], ["m1", "m2"], [3.0, 900.0]
    async with http.post(
        f"{base_url(mesh)}/v2/models/fraud/infer", json=fraud_json(users, merchants, amounts, id="r-7"), headers=auth()
    ) as reply:
        assert reply.status == 200
        assert reply.content_type == "application/json"
        document = await reply.json()
    assert document["model_name"] == "fraud" and document["model_version"] and document["id"] == "r-7"
    (output,) = document["outputs"]
    assert output["name"] == "fraud_probability" and output["datatype"] == "FP32" and output["shape"] == [2]
    expected = await grpc_probabilities(mesh, users, merchants, amounts)
    assert np.allclose(output["data"], expected, rtol=1e-6)


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


async def test_binary_tensor_extension_as_tritonclient_http_sends_it(
    mesh: LocalMesh, http: aiohttp.ClientSession
) -> None:
    """tritonclient.http's default: inputs as binary data after a JSON header, outputs asked back as binary."""
    users, merchants, amounts = ["u3", "u4", "u5"], ["m3", "m4", "m5"], [10.0, 20.0, 5000.0]
    blobs = [
        bytes_tensor([u.encode() for u in users]),
        bytes_tensor([m.encode() for m in merchants]),
        np.array(amounts, dtype="<f4").tobytes(),
    ]
    header = {
        "inputs": [
            {"name": name, "datatype": datatype, "shape": [3], "parameters": {"binary_data_size": len(blob)}}
            for (name, datatype), blob in zip(
                [("user_id", "BYTES"), ("merchant_id", "BYTES"), ("amount", "FP32")], blobs, strict=True
            )
        ],
        "outputs": [{"name": "fraud_probability", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    async with http.post(
        f"{base_url(mesh)}/v2/models/fraud/versions/1/infer",
        data=head + b"".join(blobs),
        headers={**auth(), "Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/json"},
    ) as reply:
        assert reply.status == 200
        content = await reply.read()
        json_length = int(reply.headers["Inference-Header-Content-Length"])
    (output,) = json.loads(content[:json_length])["outputs"]
    assert output["parameters"]["binary_data_size"] == 12 and "data" not in output
    probabilities = np.frombuffer(content[json_length:], dtype="<f4")
    expected = await grpc_probabilities(mesh, users, merchants, amounts)
    assert np.allclose(probabilities, expected, rtol=1e-6)


async def test_a_request_as_kserves_rest_client_sends_it(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    """kserve.InferenceRESTClient (InferRequest.to_rest): the body names the model and an id, binary inputs
    carry no `data`, and the content type is application/octet-stream."""
    user, merchant = bytes_tensor([b"u8"]), bytes_tensor([b"m8"])
    amount = np.array([77.0], dtype="<f4").tobytes()
    header = {
        "id": "3f1c2a8e-kserve",
        "model_name": "fraud",
        "inputs": [
            {"name": "user_id", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(user)}},
            {
                "name": "merchant_id",
                "shape": [1],
                "datatype": "BYTES",
                "data": None,
                "parameters": {"binary_data_size": len(merchant)},
            },
            {"name": "amount", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": len(amount)}},
        ],
    }
    head = json.dumps(header).encode()
    async with http.post(
        f"{base_url(mesh)}/v2/models/fraud/infer",
        data=head + user + merchant + amount,
        headers={
            **auth(),
            "inference-header-content-length": str(len(head)),
            "content-type": "application/octet-stream",
        },
    ) as reply:
        assert reply.status == 200
        document = await reply.json()
    assert document["id"] == "3f1c2a8e-kserve"
    expected = await grpc_probabilities(mesh, ["u8"], ["m8"], [77.0])
    assert np.allclose(document["outputs"][0]["data"], expected, rtol=1e-6)


async def test_health_and_metadata(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    url = base_url(mesh)
    # Triton's clients read the status, KServe's REST client the body.
    for path, body in (("/v2/health/live", {"live": True}), ("/v2/health/ready", {"ready": True})):
        async with http.get(url + path) as reply:
            assert reply.status == 200 and await reply.json() == body, path
    async with http.get(url + "/v2") as reply:
        server = await reply.json()
    assert server["name"] == "infermesh" and "classification" in server["extensions"]
    async with http.get(url + "/v2/models/fraud", headers=auth()) as reply:
        model = await reply.json()
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        over_grpc = await client.get_model_metadata("fraud", headers=auth(), as_json=True)
    assert model["name"] == "fraud" and model["versions"] == over_grpc["versions"]
    assert [i["name"] for i in model["inputs"]] == [i["name"] for i in over_grpc["inputs"]]
    assert [i["datatype"] for i in model["outputs"]] == [o["datatype"] for o in over_grpc["outputs"]]
    async with http.get(url + "/v2/models/fraud/ready", headers=auth()) as reply:
        assert reply.status == 200
    async with http.get(url + "/v2/models/fraud/versions/999/ready", headers=auth()) as reply:
        assert reply.status == 404  # as over gRPC: NOT_FOUND for a version the model does not have


@pytest.mark.parametrize(
    ("key", "model", "status"),
    [
        (None, "fraud", 401),
        ("not-a-key-0123456789", "fraud", 401),
        (LIMITED_KEY, "fraud", 403),  # a model the tenant may not use
        (LIMITED_KEY, "no_such_model", 403),  # nor learn whether it exists
        (ALL_MODELS_KEY, "no_such_model", 404),
    ],
)
async def test_refusals_before_the_body(
    mesh: LocalMesh, http: aiohttp.ClientSession, key: str | None, model: str, status: int
) -> None:
    headers = auth(key) if key else {}
    async with http.post(f"{base_url(mesh)}/v2/models/{model}/infer", data=b"{", headers=headers) as reply:
        assert reply.status == status
        # Exactly this type: KServe's REST client reads the error text only then.
        assert reply.headers["Content-Type"] == "application/json"
        assert (await reply.json())["error"]


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send a request's head only (its body never comes) and read the answer: what the front decides from the
    headers alone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        rest = await asyncio.wait_for(reader.read(4096), timeout=10)
    finally:
        writer.close()
    return int(status_line.split()[1]), rest


@pytest.mark.parametrize(
    ("authorization", "status"),
    [("", 401), ("Authorization: Bearer test-demo-key-0123456789\r\n", 413)],
)
async def test_a_body_is_refused_from_its_headers_without_being_read(
    mesh: LocalMesh, authorization: str, status: int
) -> None:
    assert mesh.gateway is not None
    head = (
        "POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{authorization}Content-Length: {64 * 1024 * 1024}\r\n\r\n"
    ).encode()
    code, rest = await raw_exchange(mesh.gateway.http_port, head)
    assert code == status
    assert b'"error"' in rest


@pytest.mark.parametrize(
    ("document", "names"),
    [
        (fraud_json(["u1", "u2"], ["m1"], [1.0, 2.0]), "merchant_id"),
        (fraud_json(["u1"], ["m1"], [1.0]) | {"outputs": [{"name": "nope"}]}, "nope"),
        ({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1]}]}, "rank"),
    ],
)
async def test_malformed_requests_are_400_naming_the_tensor(
    mesh: LocalMesh, http: aiohttp.ClientSession, document: dict[str, Any], names: str
) -> None:
    async with http.post(f"{base_url(mesh)}/v2/models/fraud/infer", json=document, headers=auth()) as reply:
        assert reply.status == 400
        assert names in (await reply.json())["error"]
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:  # a well-behaved client is served
        await client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth())


async def test_unknown_paths_and_methods_answer_in_the_protocols_form(
    mesh: LocalMesh, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{base_url(mesh)}/v2/nothing/here") as reply:
        assert reply.status == 404 and (await reply.json())["error"]
        assert "Server" not in reply.headers
    async with http.get(f"{base_url(mesh)}/v2/models/fraud/infer", headers=auth()) as reply:
        assert reply.status == 405 and (await reply.json())["error"]


async def test_a_tenant_past_its_quota_gets_429_with_a_retry_hint(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    """The flood tenant (20/s, burst 10, 4 in flight) sends 40 at once: the excess is 429 with Retry-After, and
    another tenant's requests meanwhile all succeed."""
    url = f"{base_url(mesh)}/v2/models/fraud/infer"
    document = fraud_json(["u1"], ["m1"], [1.0])

    async def send(key: str) -> tuple[int, str | None]:
        async with http.post(url, json=document, headers=auth(key)) as reply:
            await reply.read()
            return reply.status, reply.headers.get("Retry-After")

    flood = [send(FLOOD_KEY) for _ in range(40)]
    others = [send(ALL_MODELS_KEY) for _ in range(10)]
    results = await asyncio.gather(*flood, *others)
    flood_results, other_results = results[:40], results[40:]
    refused = [hint for status, hint in flood_results if status == 429]
    assert refused and all(hint is not None and int(hint) >= 1 for hint in refused)
    assert {status for status, _ in flood_results} <= {200, 429}
    assert all(status == 200 for status, _ in other_results)


async def test_requests_are_counted_per_method_and_model(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    assert mesh.gateway is not None
    labels = 'method="HTTP ModelInfer",model="fraud"'
    before = metric(mesh.gateway.metrics_port, "infermesh_requests_total", labels)
    async with http.post(
        f"{base_url(mesh)}/v2/models/fraud/infer", json=fraud_json(["u9"], ["m9"], [1.0]), headers=auth()
    ) as reply:
        assert reply.status == 200
    assert metric(mesh.gateway.metrics_port, "infermesh_requests_total", labels) == before + 1


async def test_the_http_front_serves_tls_with_the_grpc_ports_certificate(tls_mesh: LocalMesh) -> None:
    assert tls_mesh.options.tls_dir is not None
    context = ssl.create_default_context(cafile=str(tls_mesh.options.tls_dir / "ca.pem"))
    # The gateway's public port takes any TLS client (no client certificate needed to reach the API).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"{base_url(tls_mesh, 'https')}/v2/models/fraud/infer",
            json=fraud_json(["u1"], ["m1"], [2.0]),
            headers=auth(),
            ssl=context,
        ) as reply:
            assert reply.status == 200
            assert (await reply.json())["outputs"][0]["shape"] == [1]
        with pytest.raises(aiohttp.ClientError):  # plaintext to the TLS port gets no answer
            async with session.get(f"{base_url(tls_mesh)}/v2/health/live") as reply:
                await reply.read()


async def test_model_config_as_tritons_http_api_writes_it(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{base_url(mesh)}/v2/models/fraud/config", headers=auth()) as reply:
        assert reply.status == 200
        config = await reply.json()
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        over_grpc = (await client.get_model_config("fraud", headers=auth(), as_json=True))["config"]
    assert config["name"] == "fraud" and config["max_batch_size"] == over_grpc["max_batch_size"]
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [
        (i["name"], i["data_type"]) for i in over_grpc["input"]
    ]
    # 64-bit integers as JSON numbers (Triton's form), not protobuf JSON's strings.
    assert all(isinstance(d, int) for i in config["input"] for d in i["dims"])
    async with http.get(f"{base_url(mesh)}/v2/models/fraud/config", headers=auth(LIMITED_KEY)) as reply:
        assert reply.status == 403


async def test_statistics_per_model_and_for_every_model_the_tenant_sees(
    mesh: LocalMesh, http: aiohttp.ClientSession
) -> None:
    url = base_url(mesh)
    async with http.post(f"{url}/v2/models/fraud/infer", json=fraud_json(["u1"], ["m1"], [1.0]), headers=auth()):
        pass
    async with http.get(f"{url}/v2/models/fraud/stats", headers=auth()) as reply:
        assert reply.status == 200
        (fraud,) = (await reply.json())["model_stats"]
    assert fraud["name"] == "fraud" and fraud["inference_count"] >= 1
    assert fraud["inference_stats"]["success"]["count"] >= 1 and isinstance(
        fraud["inference_stats"]["success"]["ns"], int
    )
    async with http.get(f"{url}/v2/models/stats", headers=auth(LIMITED_KEY)) as reply:
        names = {entry["name"] for entry in (await reply.json())["model_stats"]}
    assert names == {"bench_mlp"}  # only the tenant's own models


async def test_the_repository_api_over_http_is_for_admins(mesh: LocalMesh, http: aiohttp.ClientSession) -> None:
    url = base_url(mesh)
    async with http.post(f"{url}/v2/repository/index", json={"ready": True}, headers=auth(ADMIN_KEY)) as reply:
        assert reply.status == 200
        index = await reply.json()
    assert {"name": "fraud", "state": "READY"}.items() <= next(e for e in index if e["name"] == "fraud").items()
    for key, status in ((None, 401), (ALL_MODELS_KEY, 403)):
        headers = auth(key) if key else {}
        async with http.post(f"{url}/v2/repository/index", headers=headers) as reply:
            assert reply.status == status
        async with http.post(f"{url}/v2/repository/models/fraud/unload", headers=headers) as reply:
            assert reply.status == status
    admin = auth(ADMIN_KEY)
    async with http.post(f"{url}/v2/repository/models/fraud/load", headers=admin) as reply:
        assert reply.status == 200  # loaded as it is: nothing changes
    async with http.post(
        f"{url}/v2/repository/models/fraud/load", json={"parameters": {"file:1/model.pt": "AAAA"}}, headers=admin
    ) as reply:
        assert reply.status == 400 and "publish" in (await reply.json())["error"]
    async with http.post(
        f"{url}/v2/repository/models/fraud/load", json={"parameters": {"config": '{"inputs": 3}'}}, headers=admin
    ) as reply:
        assert reply.status == 400
    async with http.post(f"{url}/v2/repository/models/no_such_model/unload", headers=admin) as reply:
        assert reply.status == 404
    async with http.post(
        f"{url}/v2/models/fraud/infer", json=fraud_json(["u1"], ["m1"], [1.0]), headers=auth()
    ) as reply:
        assert reply.status == 200  # still serving


def test_tritonclient_http_unchanged(mesh: LocalMesh) -> None:
    """Triton's own HTTP client, as a Triton user runs it: binary tensors by default, JSON on request,
    metadata, config, statistics, classification and its error reporting."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    assert mesh.gateway is not None
    client = httpclient.InferenceServerClient(f"127.0.0.1:{mesh.gateway.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("fraud", headers=auth())
        assert client.get_model_metadata("fraud", headers=auth())["name"] == "fraud"
        assert client.get_model_config("fraud", headers=auth())["name"] == "fraud"
        stats = client.get_inference_statistics("fraud", headers=auth())
        assert [s["name"] for s in stats["model_stats"]] == ["fraud"]

        users, merchants, amounts = ["u11", "u12"], ["m11", "m12"], [12.0, 3000.0]
        expected = asyncio.run(grpc_probabilities(mesh, users, merchants, amounts))
        for binary in (True, False):
            inputs = [
                httpclient.InferInput("user_id", [2], "BYTES"),
                httpclient.InferInput("merchant_id", [2], "BYTES"),
                httpclient.InferInput("amount", [2], "FP32"),
            ]
            inputs[0].set_data_from_numpy(np.array([u.encode() for u in users], dtype=object), binary_data=binary)
            inputs[1].set_data_from_numpy(np.array([m.encode() for m in merchants], dtype=object), binary_data=binary)
            inputs[2].set_data_from_numpy(np.array(amounts, dtype=np.float32), binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("fraud_probability", binary_data=binary)]
            result = client.infer("fraud", inputs, outputs=outputs, request_id="r-9", headers=auth())
            assert np.allclose(result.as_numpy("fraud_probability"), expected, rtol=1e-6), binary
            assert result.get_response()["id"] == "r-9"

        classes = [httpclient.InferRequestedOutput("fraud_probability", class_count=1)]
        result = client.infer("fraud", inputs, outputs=classes, headers=auth())
        top = result.as_numpy("fraud_probability")
        assert top.shape == (2, 1) and float(top[1, 0].decode().split(":")[0]) == pytest.approx(expected[1], rel=1e-5)

        with pytest.raises(InferenceServerException) as refused:
            client.infer("fraud", inputs, headers=auth(LIMITED_KEY))
        assert refused.value.status() == "403" and "fraud" in refused.value.message()
    finally:
        client.close()
