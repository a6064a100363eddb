"""Open Inference Protocol servicer of the router: protobuf ↔ core types, nothing more."""

from __future__ import annotations

from infermesh import __version__, oip
from infermesh.interceptors import label_request
from infermesh.proto import inference_pb2, inference_pb2_grpc
from infermesh.segments import SEGMENTS
from infermesh.tensors import decode_inputs
from router.core import RouterCore


class RouterServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def ServerLive(self, request, context):
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return inference_pb2.ServerReadyResponse(ready=self.core.ready())

    async def ServerMetadata(self, request, context):
        return inference_pb2.ServerMetadataResponse(
            name=f"{oip.SERVER_NAME}-router", version=__version__, extensions=oip.EXTENSIONS
        )

    async def ModelReady(self, request, context):
        return inference_pb2.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version))

    async def ModelMetadata(self, request, context):
        entry = self.core.model(request.name)
        if request.version:
            entry.resolve_version(request.version)
        label_request(request.name, request.version)
        config = entry.config
        return oip.model_metadata(config.name, entry.versions, config.platform, config.inputs, config.outputs)

    async def ModelInfer(self, request, context):
        entry = self.core.model(request.model_name)
        label_request(entry.config.name, request.model_version)
        deadline = self.core.deadline(context.time_remaining())
        tensors = decode_inputs(request)
        if SEGMENTS in request.parameters:  # a gateway batch of several clients' requests
            served, names, results = await self.core.infer_segments(
                request.model_name,
                request.model_version,
                tensors,
                oip.requested_outputs(request),
                deadline,
                request.parameters[SEGMENTS].string_param,
            )
            return oip.segmented_response(entry.config.name, served, names, results)
        result = await self.core.infer(
            request.model_name,
            request.model_version,
            tensors,
            oip.requested_outputs(request),
            deadline,
        )
        return oip.infer_response(result.model, result.version, request.id, result.outputs, result.parameters)

    async def RepositoryIndex(self, request, context):
        return inference_pb2.RepositoryIndexResponse(
            models=[
                inference_pb2.RepositoryIndexResponse.ModelIndex(
                    name=name, version=entry.latest, state="READY" if self.core.ready() else "UNAVAILABLE"
                )
                for name, entry in sorted(self.core.models.items())
            ]
        )


def full_service_name() -> str:
    return inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
