"""Per-hop timing on request: `infermesh_timing: true` returns the time the request spent in each hop, in
parts that add up to no more than what the client measured; without it, no timing is returned."""

from __future__ import annotations

import asyncio
import time

import tritonclient.grpc.aio as aioclient

from demo.mesh import LocalMesh
from tests.e2e.meshes import auth, fraud_inputs

PARTS = {
    "infermesh_timing_gateway_ms",
    "infermesh_timing_router_wait_ms",
    "infermesh_timing_router_ms",
    "infermesh_timing_feature_read_ms",
    "infermesh_timing_model_queue_ms",
    "infermesh_timing_forward_ms",
    "infermesh_timing_transport_ms",
}


async def test_every_hop_reports_its_time_alone_and_coalesced(mesh: LocalMesh) -> None:
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:

        async def timed(i: int) -> tuple[dict[str, float], float]:
            started = time.perf_counter()
            result = await client.infer(
                "fraud",
                fraud_inputs([f"u{i}"], [f"m{i}"], [float(i)]),
                headers=auth(),
                parameters={"infermesh_timing": True},
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
            parameters = result.get_response().parameters
            return {
                k: float(v.string_param) for k, v in parameters.items() if k.startswith("infermesh_timing")
            }, elapsed_ms

        alone = [await timed(1)]
        together = await asyncio.gather(*(timed(i) for i in range(16)))  # coalesced at gateway and router
        plain = await client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth())
    for parts, elapsed_ms in alone + together:
        assert set(parts) == PARTS, parts
        assert all(value >= 0 for value in parts.values()), parts
        assert sum(parts.values()) <= elapsed_ms, (parts, elapsed_ms)
        assert parts["infermesh_timing_forward_ms"] > 0 and parts["infermesh_timing_feature_read_ms"] > 0
    assert not [k for k in plain.get_response().parameters if k.startswith("infermesh_timing")]
