"""Per-hop timing on request: a client that sends the request parameter `infermesh_timing: true` gets, in its
response parameters, the time its request spent in each hop (milliseconds, as strings). The parts are
disjoint, so they add up to at most what the client measured. Off unless asked: nothing is measured then.
"""

from __future__ import annotations

from collections.abc import Mapping

TIMING = "infermesh_timing"  # the request parameter

GATEWAY = "infermesh_timing_gateway_ms"  # the gateway's own work: auth, admission, validation, coalescing wait
ROUTER_WAIT = "infermesh_timing_router_wait_ms"  # waiting at the router for a feature read + model call slot
ROUTER = "infermesh_timing_router_ms"  # the router's own work: validation, join, splitting the answer
FEATURE_READ = "infermesh_timing_feature_read_ms"  # the feature read (its whole round trip)
MODEL_QUEUE = "infermesh_timing_model_queue_ms"  # waiting in the model service's batching queue
FORWARD = "infermesh_timing_forward_ms"  # the forward pass of the batch that carried the request
TRANSPORT = "infermesh_timing_transport_ms"  # between the hops: gateway↔router and router↔model service

MEASURED_AT_HOPS = (GATEWAY, ROUTER_WAIT, ROUTER, FEATURE_READ, MODEL_QUEUE, FORWARD)  # all but transport
PARTS = (*MEASURED_AT_HOPS, TRANSPORT)


def wanted(parameters: Mapping[str, object]) -> bool:
    value = parameters.get(TIMING)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def ms(seconds: float) -> str:
    return f"{max(0.0, seconds) * 1000:.3f}"


def seconds_of(parameters: Mapping[str, str], keys: tuple[str, ...] = PARTS) -> float:
    """The time the parts reported by the hops below add up to."""
    total = 0.0
    for key in keys:
        value = parameters.get(key)
        if value is not None:
            try:
                total += float(value) / 1000
            except ValueError:
                continue
    return total
