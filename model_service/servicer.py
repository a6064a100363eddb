"""Thin GRPCInferenceService servicer: protobuf ↔ domain types around ModelServiceCore.

Outputs are answered raw (`raw_output_contents`), as tritonclient expects. Domain errors raised by the
core become status codes in infermesh.interceptors, not here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from infermesh import oip
from infermesh.errors import DomainError
from infermesh.interceptors import label_request
from infermesh.proto import inference_pb2, inference_pb2_grpc
from infermesh.tensors import Tensor, decode_inputs
from model_service.core import ModelServiceCore

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """grpc-python gives the time left, not the deadline: turn it into an absolute time.monotonic()."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + remaining


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: ModelServiceCore) -> None:
        self.core = core

    async def ServerLive(self, request, context):  # type: ignore[override]
        return inference_pb2.ServerLiveResponse(live=self.core.server_live())

    async def ServerReady(self, request, context):  # type: ignore[override]
        return inference_pb2.ServerReadyResponse(ready=self.core.server_ready())

    async def ModelReady(self, request, context):  # type: ignore[override]
        return inference_pb2.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):  # type: ignore[override]
        info = self.core.server_metadata()
        if info.replica_id:
            # ServerMetadataResponse has no free-form field: the replica travels as response metadata.
            await context.send_initial_metadata((("infermesh-replica-id", info.replica_id),))
        return inference_pb2.ServerMetadataResponse(name=info.name, version=info.version, extensions=info.extensions)

    async def ModelMetadata(self, request, context):  # type: ignore[override]
        info = self.core.model_metadata(request.name, request.version)
        label_request(info.name, request.version)
        return oip.model_metadata(info.name, info.versions, info.platform, info.inputs, info.outputs)

    async def ModelInfer(self, request, context):  # type: ignore[override]
        return await self._infer(request, _deadline(context))

    async def _infer(
        self, request: inference_pb2.ModelInferRequest, deadline: float | None
    ) -> inference_pb2.ModelInferResponse:
        name = request.model_name
        specs = self.core.output_specs(name)  # NotFound before anything else for an unknown model
        label_request(name, request.model_version)
        tensors = decode_inputs(request)
        wanted = [output.name for output in request.outputs]
        version, outputs = await self.core.infer(name, request.model_version, tensors, deadline, wanted)
        label_request(name, version)  # the version actually served, not the (possibly empty) one asked for
        replica_id = self.core.settings.replica_id
        return oip.infer_response(
            name,
            version,
            request.id,
            (Tensor(n, specs[n].datatype, array.shape, array) for n, array in outputs.items()),
            {"replica_id": replica_id} if replica_id else None,
        )

    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[inference_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ModelStreamInferResponse]:
        # One request at a time, in order; a failed request answers error_message and the stream goes on.
        async for request in request_iterator:
            try:
                response = await self._infer(request, _deadline(context))
            except DomainError as error:
                # The id lets a client match the error to its request (several may be in flight).
                yield inference_pb2.ModelStreamInferResponse(
                    error_message=str(error),
                    infer_response=inference_pb2.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
            else:
                yield inference_pb2.ModelStreamInferResponse(infer_response=response)

    async def RepositoryIndex(self, request, context):  # type: ignore[override]
        response = inference_pb2.RepositoryIndexResponse()
        for entry in self.core.repository_index(ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response
