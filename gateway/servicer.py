"""The public OIP endpoint. ModelInfer is a cheap hop: the request is parsed once for validation and
its original bytes are forwarded; the router's response bytes go back to the client untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from gateway.core import GatewayCore
from gateway.router_calls import RouterCalls
from gateway.router_client import RouterClient
from infermesh import __version__, oip
from infermesh.errors import DomainError
from infermesh.interceptors import label_request, status_for
from infermesh.proto import inference_pb2 as pb
from infermesh.tensors import decode_inputs

SERVICE = "inference.GRPCInferenceService"


@dataclass(slots=True)
class ParsedInfer:
    message: pb.ModelInferRequest
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> ParsedInfer:
        return cls(pb.ModelInferRequest.FromString(raw), raw)


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


class GatewayServicer:
    def __init__(
        self, core: GatewayCore, router: RouterClient, router_calls: RouterCalls, default_timeout_s: float
    ) -> None:
        self.core = core
        self.router = router
        self.router_calls = router_calls
        self.default_timeout_s = default_timeout_s

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.default_timeout_s if remaining is None else min(remaining, self.default_timeout_s)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.router.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=oip.SERVER_NAME, version=__version__, extensions=oip.EXTENSIONS)

    async def ModelReady(self, request, context):
        self.core.authorized_model(_authorization(context), request.name, request.version)
        return pb.ModelReadyResponse(ready=await self.router.model_ready(request.name, request.version))

    async def ModelMetadata(self, request, context):
        entry = self.core.authorized_model(_authorization(context), request.name, request.version)
        label_request(request.name, request.version)
        config = entry.config
        return oip.model_metadata(config.name, entry.versions, config.platform, config.inputs, config.outputs)

    async def ModelConfig(self, request, context):
        entry = self.core.authorized_model(_authorization(context), request.name, request.version)
        label_request(request.name, request.version)
        return oip.model_config(entry.config)

    async def RepositoryIndex(self, request, context):
        tenant = self.core.keys.authenticate(_authorization(context))
        ready = await self.router.ready()
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=name, version=entry.latest, state="READY" if ready else "UNAVAILABLE"
                )
                for name, entry in sorted(self.core.models.items())
                if tenant.allows(name)
            ]
        )

    async def ModelInfer(self, request: ParsedInfer, context) -> bytes:
        return await self._infer(request, _authorization(context), self._timeout(context))

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        authorization = _authorization(context)
        async for request in request_iterator:
            try:
                response = await self._infer(request, authorization, self._timeout(context))
                yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(response))
            except DomainError as error:
                # Triton's stream semantics: the stream stays open, the error travels in the message.
                yield pb.ModelStreamInferResponse(
                    error_message=f"{status_for(error).name}: {error}",
                    infer_response=pb.ModelInferResponse(id=request.message.id),
                )

    async def _infer(self, request: ParsedInfer, authorization: str | None, timeout_s: float) -> bytes:
        message = request.message
        entry = self.core.authorized_model(authorization, message.model_name, message.model_version)
        label_request(entry.config.name, message.model_version)
        with self.core.admission:
            if message.parameters:
                self.core.check_parameters(message.parameters)
            tensors = decode_inputs(message)
            rows = self.core.validate(entry, tensors)
            return await self.router_calls.infer(entry, message, request.raw, tensors, rows, timeout_s)


def _unary(behavior, request_type, response_serializer=None) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=request_type.FromString if hasattr(request_type, "FromString") else request_type,
        response_serializer=response_serializer or (lambda message: message.SerializeToString()),
    )


def add_to_server(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "ServerLive": _unary(servicer.ServerLive, pb.ServerLiveRequest),
        "ServerReady": _unary(servicer.ServerReady, pb.ServerReadyRequest),
        "ServerMetadata": _unary(servicer.ServerMetadata, pb.ServerMetadataRequest),
        "ModelReady": _unary(servicer.ModelReady, pb.ModelReadyRequest),
        "ModelMetadata": _unary(servicer.ModelMetadata, pb.ModelMetadataRequest),
        "RepositoryIndex": _unary(servicer.RepositoryIndex, pb.RepositoryIndexRequest),
        "ModelConfig": _unary(servicer.ModelConfig, pb.ModelConfigRequest),
        # Bytes out as they came from the router: no re-serialisation on the hot path.
        "ModelInfer": _unary(servicer.ModelInfer, ParsedInfer.parse, response_serializer=bytes),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer,
            request_deserializer=ParsedInfer.parse,
            response_serializer=lambda message: message.SerializeToString(),
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
