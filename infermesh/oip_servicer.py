"""The one servicer of `inference.GRPCInferenceService`: serves any dataplane (the gateway, router and model
service cores) over gRPC. It only converts protobuf ↔ domain types; domain errors become status codes in
infermesh.method_handlers. Each call's deadline is built here, once, from the gRPC context."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from infermesh import oip
from infermesh.dataplane import Call, Dataplane, InferAnswer, InferRequest, StreamError
from infermesh.errors import InvalidInput
from infermesh.method_handlers import BodyWaits, call_of, deadline_of, first_message, stream_messages
from infermesh.proto import inference_pb2 as pb
from infermesh.repository import REPOSITORY_TIMEOUT_S

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The methods that answer without credentials (as Triton's do); their handlers read the request themselves.
OPEN_METHODS = frozenset(f"/{SERVICE}/{name}" for name in ("ServerLive", "ServerReady", "ServerMetadata"))
MODEL_INFER = f"/{SERVICE}/ModelInfer"


class OipServicer:
    def __init__(self, dataplane: Dataplane, default_timeout_s: float) -> None:
        self.dataplane = dataplane
        self.default_timeout_s = default_timeout_s

    def _call(self, context: grpc.aio.ServicerContext) -> Call:
        return call_of(context, self.default_timeout_s)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=await self.dataplane.server_live(self._call(context)))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await self.dataplane.server_ready(self._call(context)))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        info = await self.dataplane.server_metadata(self._call(context))
        if info.replica_id:
            await context.send_initial_metadata((("infermesh-replica-id", info.replica_id),))
        return oip.server_metadata(info)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        ready = await self.dataplane.model_ready(self._call(context), request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        info = await self.dataplane.model_metadata(self._call(context), request.name, request.version)
        return oip.model_metadata(info)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Any:
        config = await self.dataplane.model_config(self._call(context), request.name, request.version)
        return oip.model_config(config)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        return oip.repository_index(await self.dataplane.repository_index(self._call(context), request.ready))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> Any:
        entries = await self.dataplane.model_statistics(self._call(context), request.name, request.version)
        return oip.model_statistics(entries)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        call = self.dataplane.authenticate(call_of(context, REPOSITORY_TIMEOUT_S))
        config_json = oip.load_config_of(request.parameters)
        await self.dataplane.repository_load(call, request.model_name, config_json)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        call = self.dataplane.authenticate(call_of(context, REPOSITORY_TIMEOUT_S))
        await self.dataplane.repository_unload(call, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, encoded: bytes, context: grpc.aio.ServicerContext) -> InferAnswer:
        # The request arrives as bytes: parsed only once the caller is authenticated, and kept (a hop may
        # forward them unchanged).
        call = self.dataplane.authenticate(self._call(context))
        return await self.dataplane.infer(call, oip.parse_infer_request(encoded))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # An unauthenticated stream ends here, at once, before it reads a message or holds a slot for long.
        caller = self.dataplane.authenticate(self._call(context))
        counter = stream_messages.get()
        started: deque[float] = deque()  # answers come in order: the oldest start is the next answer's

        async def requests() -> AsyncIterator[tuple[Call, InferRequest]]:
            async for encoded in request_iterator:
                if counter is not None:
                    started.append(counter.begin())
                # Each message gets its own deadline (the stream's, else the default from now).
                call = replace(caller, deadline=deadline_of(context, self.default_timeout_s))
                try:
                    request = oip.parse_infer_request(encoded)
                except InvalidInput:  # a message that does not parse ends the stream (INVALID_ARGUMENT)
                    if counter is not None:
                        counter.end(started.pop(), "INVALID_ARGUMENT")
                    raise
                yield call, request

        answer: InferAnswer | StreamError
        try:
            async for answer in self.dataplane.stream(requests()):
                if counter is not None and started:
                    code = answer.error.code.name if isinstance(answer, StreamError) else "OK"
                    counter.end(started.popleft(), code)
                yield oip.stream_response(answer)
        finally:
            while counter is not None and started:  # the stream ended with messages unanswered
                counter.end(started.popleft(), "CANCELLED")


def _unary(behavior: Any, request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
    )


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()  # type: ignore[no-any-return]  # protobuf messages are untyped here


def _open(behavior: Any, request_type: Any, waits: BodyWaits) -> grpc.RpcMethodHandler:
    """A method that answers without credentials: its handler reads the request itself, bounded (first_message),
    since no credential check can refuse a call of it before its body."""
    return grpc.stream_unary_rpc_method_handler(
        first_message(behavior, waits), request_deserializer=request_type.FromString, response_serializer=_serialize
    )


def add_to_server(servicer: OipServicer, server: Any) -> None:
    waits = BodyWaits()
    handlers = {
        "ServerLive": _open(servicer.ServerLive, pb.ServerLiveRequest, waits),
        "ServerReady": _open(servicer.ServerReady, pb.ServerReadyRequest, waits),
        "ServerMetadata": _open(servicer.ServerMetadata, pb.ServerMetadataRequest, waits),
        "ModelReady": _unary(servicer.ModelReady, pb.ModelReadyRequest),
        "ModelMetadata": _unary(servicer.ModelMetadata, pb.ModelMetadataRequest),
        "ModelConfig": _unary(servicer.ModelConfig, pb.ModelConfigRequest),
        "RepositoryIndex": _unary(servicer.RepositoryIndex, pb.RepositoryIndexRequest),
        "ModelStatistics": _unary(servicer.ModelStatistics, pb.ModelStatisticsRequest),
        "RepositoryModelLoad": _unary(servicer.RepositoryModelLoad, pb.RepositoryModelLoadRequest),
        "RepositoryModelUnload": _unary(servicer.RepositoryModelUnload, pb.RepositoryModelUnloadRequest),
        # Parsed after authentication, bytes kept; an answer already in wire form goes back byte for byte.
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer, request_deserializer=None, response_serializer=oip.encode_answer
        ),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer, request_deserializer=None, response_serializer=_serialize
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
