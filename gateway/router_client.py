"""The gateway's client of the router: forwards ModelInfer bytes as they are, retries when unavailable."""

from __future__ import annotations

import time

import grpc

from infermesh.channels import insecure_channel
from infermesh.errors import Unavailable
from infermesh.interceptors import error_from_rpc
from infermesh.proto import inference_pb2 as pb
from infermesh.retry import with_retries

_INFER = "/inference.GRPCInferenceService/ModelInfer"
READY_CACHE_S = 1.0


class RouterClient:
    def __init__(self, target: str, max_message_bytes: int, attempts: int) -> None:
        self.channel = insecure_channel(target, max_message_bytes)
        # No (de)serializers: bytes in, bytes out.
        self._infer = self.channel.unary_unary(_INFER)
        self._server_ready = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        self._model_ready = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        self._attempts = attempts
        self._ready_at = 0.0
        self._ready = False

    async def infer(self, raw_request: bytes, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s

        async def call() -> bytes:
            try:
                return await self._infer(raw_request, timeout=max(0.0, deadline - time.monotonic()))
            except grpc.aio.AioRpcError as error:
                raise error_from_rpc(error, "router") from None

        return await with_retries(call, deadline, self._attempts, 0.002, 0.05, retry_on=(Unavailable,))

    async def ready(self) -> bool:
        now = time.monotonic()
        if now - self._ready_at > READY_CACHE_S:
            try:
                self._ready = (await self._server_ready(pb.ServerReadyRequest(), timeout=0.5)).ready
            except grpc.aio.AioRpcError:
                self._ready = False
            self._ready_at = now
        return self._ready

    async def model_ready(self, name: str, version: str) -> bool:
        try:
            reply = await self._model_ready(pb.ModelReadyRequest(name=name, version=version), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return reply.ready

    async def close(self) -> None:
        await self.channel.close()
