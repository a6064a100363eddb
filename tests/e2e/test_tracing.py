"""One trace spans gateway → router → feature service → model service; spans end on deadline expiry.

The services export over OTLP/gRPC (configured only by the standard OTEL_* variables) to a collector
this test runs in-process.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import tritonclient.grpc.aio as aioclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tritonclient.utils import InferenceServerException

from demo.mesh import LocalMesh
from tests.e2e.meshes import auth, fraud_inputs, start_mesh

SERVICES = {"gateway", "router", "feature_service", "model_service"}
SERVER, CLIENT = 2, 3  # OTLP SpanKind


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span by trace id: (service, span name, kind, start, end, linked trace ids)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[str, str, int, int, int, tuple[str, ...]]]] = defaultdict(list)

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    links = tuple(link.trace_id.hex() for link in span.links)
                    self.spans[span.trace_id.hex()].append(
                        (service, span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano, links)
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, trace_id: str, predicate, timeout_s: float = 20.0) -> list:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.spans.get(trace_id, [])):
                return self.spans[trace_id]
            await asyncio.sleep(0.05)  # spans arrive in export batches
        return self.spans.get(trace_id, [])


@pytest.fixture(scope="module")
def collector_and_mesh(
    demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Collector, LocalMesh]]:
    loop = asyncio.new_event_loop()
    collector = Collector()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    import threading

    server_ready: list = []
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server_ready.append(loop.run_until_complete(serve()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    server, port = server_ready[0]
    import os

    saved = dict(os.environ)
    os.environ.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    try:
        mesh = start_mesh(
            demo_dir, tmp_path_factory.mktemp("traced"), replicas=1, model_service={"inject_delay_ms": 300}
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield collector, mesh
    mesh.stop()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def one_transaction() -> list:
    return fraud_inputs(["u5"], ["m5"], [42.0])


def traceparent() -> tuple[str, dict[str, str]]:
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


async def test_one_trace_spans_all_four_services(collector_and_mesh) -> None:
    collector, mesh = collector_and_mesh
    trace_id, header = traceparent()
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        result = await client.infer("fraud", one_transaction(), headers={**auth(), **header})
    assert result.as_numpy("fraud_probability").shape == (1,)

    wanted = {"redis.mget", "batch.queue_wait", "model.forward", "router.feature_fetch"}

    def complete(spans: list) -> bool:
        return {s[0] for s in spans} >= SERVICES and wanted <= {s[1] for s in spans}

    spans = await collector.wait_for(trace_id, complete)
    assert {s[0] for s in spans} >= SERVICES, spans
    assert wanted <= {s[1] for s in spans}, spans
    names = {(s[0], s[1]) for s in spans}
    assert ("gateway", "/inference.GRPCInferenceService/ModelInfer") in names
    assert ("router", "/infermesh.features.v1.FeatureStore/BatchReadFeatures") in names
    assert ("model_service", "/inference.GRPCInferenceService/ModelInfer") in names


async def test_a_request_over_http_is_one_trace_too(collector_and_mesh) -> None:
    collector, mesh = collector_and_mesh
    trace_id, header = traceparent()
    document = {
        "inputs": [
            {"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u6"]},
            {"name": "merchant_id", "datatype": "BYTES", "shape": [1], "data": ["m6"]},
            {"name": "amount", "datatype": "FP32", "shape": [1], "data": [42.0]},
        ]
    }
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{mesh.gateway.http_port}/v2/models/fraud/infer"
        async with session.post(url, json=document, headers={**auth(), **header}) as reply:
            assert reply.status == 200

    def complete(spans: list) -> bool:
        return {s[0] for s in spans} >= SERVICES

    spans = await collector.wait_for(trace_id, complete)
    assert {s[0] for s in spans} >= SERVICES, spans
    assert ("gateway", "HTTP ModelInfer", SERVER) in {(s[0], s[1], s[2]) for s in spans}


async def test_spans_end_when_the_deadline_expires(collector_and_mesh) -> None:
    collector, mesh = collector_and_mesh
    # The replica takes 300 ms per batch: the 150 ms deadline runs out while the model computes.
    trace_id, header = traceparent()
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        with pytest.raises(InferenceServerException) as caught:
            await client.infer("fraud", one_transaction(), headers={**auth(), **header}, client_timeout=0.15)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    method = "/inference.GRPCInferenceService/ModelInfer"
    expected = {
        ("gateway", method, SERVER),
        ("gateway", method, CLIENT),
        ("router", method, SERVER),
        ("router", method, CLIENT),  # the aio client interceptor is known to leak this one on cancel
        ("model_service", method, SERVER),
    }

    def all_ended(spans: list) -> bool:
        return expected <= {(s[0], s[1], s[2]) for s in spans}

    spans = await collector.wait_for(trace_id, all_ended)
    assert expected <= {(s[0], s[1], s[2]) for s in spans}, spans
    assert all(end >= start > 0 for _, _, _, start, end, _ in spans)


def reachable(collector: Collector, trace_id: str) -> set[tuple[str, str]]:
    """(service, span name) of every span in a trace or in the traces its spans link to, transitively."""
    seen, todo, names = {trace_id}, [trace_id], set()
    while todo:
        for service, name, _, _, _, links in collector.spans.get(todo.pop(), []):
            names.add((service, name))
            for linked in links:
                if linked not in seen:
                    seen.add(linked)
                    todo.append(linked)
    return names


async def test_coalesced_requests_keep_their_own_traces_linked_to_the_work_that_served_them(
    collector_and_mesh,
) -> None:
    """16 concurrent requests, each with its own trace: the gateway and router coalesce them, yet each trace
    holds only its own request's spans, and its links lead to the feature read and the forward pass."""
    collector, mesh = collector_and_mesh
    headers = [traceparent() for _ in range(16)]
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        results = await asyncio.gather(
            *(
                client.infer("fraud", fraud_inputs([f"u{i}"], [f"m{i}"], [float(i)]), headers={**auth(), **header})
                for i, (_, header) in enumerate(headers)
            )
        )
    assert all(r.as_numpy("fraud_probability").shape == (1,) for r in results)
    request_traces = [trace_id for trace_id, _ in headers]
    served = {("feature_service", "redis.mget"), ("model_service", "model.forward")}
    gateway_call = ("gateway", "/inference.GRPCInferenceService/ModelInfer")

    deadline = time.monotonic() + 20
    for _ in range(400):  # spans arrive in export batches: await them, up to 20 s
        if time.monotonic() > deadline or all(
            served | {gateway_call} <= reachable(collector, t) for t in request_traces
        ):
            break
        await asyncio.sleep(0.05)
    for trace_id in request_traces:
        assert served <= reachable(collector, trace_id), trace_id
        gateway_servers = [s for s in collector.spans[trace_id] if s[0] == "gateway" and s[2] == SERVER]
        assert len(gateway_servers) == 1, "one request's trace holds exactly its own gateway call"
    # Batches of several requests live in traces of their own, linked to the requests: no request's span there.
    batch_traces = {linked for t in request_traces for span in collector.spans[t] for linked in span[5]}
    assert batch_traces, "the requests were never coalesced: the test did not exercise batches"
    for trace_id in batch_traces - set(request_traces):
        assert not [s for s in collector.spans[trace_id] if s[0] == "gateway" and s[2] == SERVER], trace_id
