"""Cheap attacks on the gateway, each answered with a clear status while a well-behaved client is unaffected:
idle unauthenticated streams and unary calls whose body never comes, amplification by a huge BYTES tensor,
shapes that overflow or go too deep."""

from __future__ import annotations

import asyncio
import re
import struct
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aioclient
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from demo.mesh import LocalMesh
from tests.e2e.meshes import FLOOD_KEY, auth, fraud_inputs

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def fraud_request(
    user_shape: list[int], user_raw: bytes, rows: int = 1, amount_shape: list[int] | None = None
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest as a client may craft it: any shapes, any raw contents."""
    request = service_pb2.ModelInferRequest(model_name="fraud", id="crafted")
    request.inputs.add(name="user_id", datatype="BYTES", shape=user_shape)
    request.inputs.add(name="merchant_id", datatype="BYTES", shape=[rows])
    request.inputs.add(name="amount", datatype="FP32", shape=amount_shape or [rows])
    merchants = b"".join(struct.pack("<I", 2) + b"m1" for _ in range(rows))
    request.raw_input_contents.extend([user_raw, merchants, np.ones(rows, "<f4").tobytes()])
    return request


async def good_request(client: aioclient.InferenceServerClient) -> None:
    result = await client.infer("fraud", fraud_inputs(["u1"], ["m1"], [10.0]), headers=auth())
    assert result.as_numpy("fraud_probability").shape == (1,)


async def test_unauthenticated_streams_are_closed_at_once_and_take_nothing(mesh: LocalMesh) -> None:
    """400 streams opened without a key and never sending a message used to hold every call slot (health checks
    included answered RESOURCE_EXHAUSTED). Now each ends at once, UNAUTHENTICATED (or refused by gRPC itself: past
    the streams one connection may open, or a burst beyond core's backlog), nothing stays held, and the health
    port answers throughout."""
    async with (
        grpc.aio.insecure_channel(mesh.gateway_address) as channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh.gateway.health_port}") as probes,
    ):
        stream = channel.stream_stream(STREAM)
        health = health_pb2_grpc.HealthStub(probes)
        calls = [stream(timeout=30) for _ in range(400)]
        during = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        codes = await asyncio.gather(*(call.code() for call in calls))
        assert during.status == health_pb2.HealthCheckResponse.SERVING
        # Past the streams one connection may open, HTTP/2 itself refuses a stream (UNAVAILABLE, retryable).
        refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
        assert set(codes) <= refused
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 100
        # Nothing is held: the API port's own health check and keyed clients are served.
        api_health = health_pb2_grpc.HealthStub(channel)
        reply = await api_health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            await asyncio.gather(*(good_request(client) for _ in range(8)))


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.mark.parametrize("method", [INFER, REFLECTION], ids=["ModelInfer-body-never-sent", "idle-reflection"])
async def test_unauthenticated_calls_are_refused_before_their_body_and_hold_no_slot(
    mesh: LocalMesh, method: str
) -> None:
    """400 calls without a key that never send a message: ModelInfer calls (a unary method's body reaches Python
    only once it has arrived) and reflection streams. They used to hold every call slot, so that every other call,
    the API port's health checks included, answered RESOURCE_EXHAUSTED. Now each is refused as it starts."""
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        opened = channel.stream_stream(method)  # headers sent, and then no message at all
        calls = [opened(timeout=30) for _ in range(400)]
        codes = await asyncio.gather(*(call.code() for call in calls))
        refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
        assert set(codes) <= refused
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 100
        hold = [opened(timeout=30) for _ in range(300)]  # and while such calls keep coming
        live = await channel.unary_unary(SERVER_LIVE)(b"", timeout=5)  # an open method: no key needed
        assert live == b"\x08\x01"  # ServerLiveResponse(live=True)
        api_health = health_pb2_grpc.HealthStub(channel)
        reply = await api_health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            await asyncio.gather(*(good_request(client) for _ in range(8)))
        for call in hold:
            call.cancel()


@pytest.mark.parametrize("method", [SERVER_LIVE, HEALTH_CHECK], ids=["ServerLive", "health-Check"])
async def test_calls_of_open_methods_whose_body_never_comes_hold_few_slots_briefly(
    mesh: LocalMesh, method: str
) -> None:
    """ServerLive and the API port's health check answer without a key, so no check can refuse them before their
    body: their handlers read the request themselves, at most 32 such calls waiting at once, for at most 2 s each.
    400 body-less calls: the rest are refused at once, the waiting ones end DEADLINE_EXCEEDED, and keyed inference
    is served throughout."""
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        opened = channel.stream_unary(method)
        calls = [opened(timeout=30) for _ in range(400)]
        ended = [asyncio.ensure_future(call.code()) for call in calls]
        deadline = time.monotonic() + 10
        while sum(task.done() for task in ended) < len(calls) - 32:  # the refused ones end at once
            assert time.monotonic() < deadline, "the calls past the 32 waiting were not refused"
            await asyncio.sleep(0.01)
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:  # while those may still wait
            await asyncio.gather(*(good_request(client) for _ in range(8)))
        codes = await asyncio.gather(*ended)
        allowed = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
        assert set(codes) <= allowed | {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
        assert 1 <= codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) <= 32
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 100
        live = await channel.unary_unary(SERVER_LIVE)(b"", timeout=5)
        assert live == b"\x08\x01"
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_keyed_client_still_uses_reflection(mesh: LocalMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [answer async for answer in stub.ServerReflectionInfo(iter([request]), metadata=list(auth().items()))]
        names = {service.name for service in answers[0].list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        refused = stub.ServerReflectionInfo(iter([request]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [answer async for answer in refused]
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_keyed_stream_still_answers_and_a_wrong_key_is_refused(mesh: LocalMesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        stream = channel.stream_stream(
            STREAM,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        wrong = stream(timeout=10, metadata=(("authorization", "Bearer wrong"),))
        assert await wrong.code() == grpc.StatusCode.UNAUTHENTICATED
        keyed = stream(timeout=10, metadata=list(auth().items()))
        await keyed.write(fraud_request([1], struct.pack("<I", 2) + b"u1"))
        answer = await keyed.read()
        assert answer.error_message == "" and answer.infer_response.id == "crafted"
        await keyed.done_writing()


@pytest.mark.parametrize(
    ("user_shape", "user_raw", "message"),
    [
        # Two million one-byte ids: refused from the declared batch, or from the buffer's size, never parsed.
        ([2_000_000], b"\x01\x00\x00\x00x" * 2_000_000, "batch size 1 differs from input .user_id. batch size 2000000"),
        ([1], b"\x01\x00\x00\x00x" * 2_000_000, "more than 1 BYTES elements of at most 256 bytes"),
        ([2**62, 2**62, 0], b"", "holds more than 2147483647 elements"),
        ([1] * 65, b"", "rank 65 exceeds 8 dimensions"),
        ([1, 1], struct.pack("<I", 2) + b"u1", r"shape \[1, 1\] does not match \[-1\]"),
    ],
    ids=["batch-flood", "bytes-flood", "overflow", "rank-65", "undeclared-dim"],
)
async def test_malformed_requests_are_invalid_argument_and_harm_no_one(
    mesh: LocalMesh, user_shape: list[int], user_raw: bytes, message: str
) -> None:
    async with grpc.aio.insecure_channel(
        mesh.gateway_address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        infer = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString)
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            bad = infer(fraud_request(user_shape, user_raw), timeout=30, metadata=list(auth().items()))
            await asyncio.gather(*(good_request(client) for _ in range(4)))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bad
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() is not None
    assert re.search(message, caught.value.details()), caught.value.details()


async def test_a_64_bit_unsigned_parameter_fails_no_request_in_its_shared_batch(mesh: LocalMesh) -> None:
    """Concurrent requests share a router call; one carrying a uint64 parameter above int64's range used to make
    re-encoding the shared call fail (INTERNAL) for every request in it."""
    marked = fraud_request([1], struct.pack("<I", 2) + b"u1")
    marked.parameters["trace_tag"].uint64_param = 2**64 - 1
    plain = fraud_request([1], struct.pack("<I", 2) + b"u2")
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        infer = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString)
        answers = await asyncio.gather(
            *(infer(marked if i % 2 else plain, timeout=30, metadata=list(auth().items())) for i in range(48)),
            return_exceptions=True,
        )
    assert not [a for a in answers if isinstance(a, BaseException)], [
        a for a in answers if isinstance(a, BaseException)
    ][:3]


async def test_a_huge_model_name_is_refused_with_a_message_every_client_accepts(mesh: LocalMesh) -> None:
    """The refusal quotes the name; quoted whole (10 KB) its status header exceeded the client's 8 KiB limit and
    the client saw RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" instead of the answer."""
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("x" * 10_000, fraud_inputs(["u1"], ["m1"], [10.0]), headers=auth())
        await good_request(client)
    # PERMISSION_DENIED for this key (a model it may not see); NOT_FOUND for a key that may see every model.
    assert caught.value.status() in {"StatusCode.NOT_FOUND", "StatusCode.PERMISSION_DENIED"}
    assert "xxxx" in (caught.value.message() or "") and len(caught.value.message() or "") <= 1100


async def test_a_tenant_past_its_quota_is_refused_with_a_retry_hint_while_another_is_served(mesh: LocalMesh) -> None:
    """Tenant "flood" (20 requests/s, burst 10, 4 in flight) sends 200 requests at once, ten times its rate
    for a second: most are refused at once with RESOURCE_EXHAUSTED, while all of another tenant's succeed."""
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:

        async def flood_one() -> str:
            try:
                await client.infer("fraud", fraud_inputs(["u2"], ["m2"], [1.0]), headers=auth(FLOOD_KEY))
            except InferenceServerException as error:
                return str(error.status())
            return "OK"

        flood = asyncio.gather(*(flood_one() for _ in range(200)))
        calm = asyncio.gather(*(good_request(client) for _ in range(50)))
        outcomes, _ = await asyncio.gather(flood, calm)  # a failed calm request raises here
    assert set(outcomes) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
    assert outcomes.count("StatusCode.RESOURCE_EXHAUSTED") >= 150
    assert 1 <= outcomes.count("OK") <= 40  # its burst, and what its rate refilled meanwhile

    # The refusal tells when to come back (google.rpc.RetryInfo in the status details).
    async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        infer = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString)
        request = fraud_request([1], struct.pack("<I", 2) + b"u1")
        for _ in range(30):  # empty the bucket
            try:
                await infer(request, timeout=10, metadata=(("authorization", f"Bearer {FLOOD_KEY}"),))
            except grpc.aio.AioRpcError as error:
                refused = error
                break
        else:
            raise AssertionError("the flood tenant was never refused")
        # Past its quota a call is refused as it starts, from its metadata, before gRPC reads the body: one whose
        # body never comes gets the same answer at once instead of waiting for it (DEADLINE_EXCEEDED).
        bodyless = channel.stream_unary(INFER)(timeout=5, metadata=(("authorization", f"Bearer {FLOOD_KEY}"),))
        assert await bodyless.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'flood'" in (await bodyless.details() or "")
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'flood'" in (refused.details() or "")
    details = dict(refused.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 1.0


def gateway_rss_mib(mesh: LocalMesh) -> float:
    assert mesh.gateway is not None and mesh.gateway.process is not None
    for line in open(f"/proc/{mesh.gateway.process.pid}/status"):  # noqa: SIM115 - a tiny procfs read
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_refused_large_requests_are_not_kept_in_memory(mesh: LocalMesh) -> None:
    """Thirty refused 15 MiB requests: their bytes are freed as each is answered (a reference cycle through
    the abort kept every one until a full garbage collection: ~1 GB after 40)."""
    flood = fraud_request([1], b"\x01\x00\x00\x00x" * 3_000_000)
    before = gateway_rss_mib(mesh)
    async with grpc.aio.insecure_channel(
        mesh.gateway_address, options=[("grpc.max_send_message_length", 32 * 1024 * 1024)]
    ) as channel:
        infer = channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString)
        for _ in range(30):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(flood, timeout=30, metadata=list(auth().items()))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert gateway_rss_mib(mesh) - before < 250, "refused requests' bytes stay in memory"


async def test_the_public_gateway_serves_no_hop_streams_while_the_router_does(mesh: LocalMesh) -> None:
    """Hop streams carry the mesh's internal calls; at the edge they would be a way around per-call limits."""
    from infermesh.hop_streams import EXCHANGE, Frame

    assert mesh.router is not None
    for address, served in ((mesh.gateway_address, False), (mesh.router.address, True)):
        async with grpc.aio.insecure_channel(address) as channel:
            exchange = channel.stream_stream(
                EXCHANGE, request_serializer=Frame.SerializeToString, response_deserializer=Frame.FromString
            )
            stream = exchange()
            frame = Frame(id=7, method="/inference.GRPCInferenceService/ModelInfer", payload=b"\xff")
            if served:
                await stream.write(frame)
                answer = await stream.read()
                assert (answer.id, answer.code) == (7, grpc.StatusCode.INVALID_ARGUMENT.value[0])
                assert "malformed request" in answer.message
                stream.cancel()
            else:
                # Refused on the call's headers, before any frame: writing one would race the refusal.
                assert await stream.code() == grpc.StatusCode.UNIMPLEMENTED
