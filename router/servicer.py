"""The router's own service, `infermesh.router.v1.Router` (the gateway's coalesced batches): protobuf ↔ core
types, nothing more. The public `inference.GRPCInferenceService` is served by infermesh.oip_servicer."""

from __future__ import annotations

from typing import Any

import grpc

from infermesh import batch_codec
from infermesh.dataplane import Call
from infermesh.method_handlers import deadline_of
from infermesh.proto import router_pb2, router_pb2_grpc
from router.core import RouterCore

SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore, default_timeout_s: float) -> None:
        self.core = core
        self.default_timeout_s = default_timeout_s

    async def InferBatch(
        self, request: router_pb2.InferBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.InferBatchResponse:
        call = Call(deadline_of(context, self.default_timeout_s))  # callers inside the mesh: no credentials
        result = await self.core.infer_batch(call, batch_codec.infer_batch(request))
        return batch_codec.batch_response(result)
