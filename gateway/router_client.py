"""The gateway's client of the router (the `RouterPort` of gateway.router_calls over gRPC): a request alone is
forwarded as the client's ModelInfer bytes, a coalesced batch as the mesh's own `Router/InferBatch`;
retried when the router is unavailable, and held while no router is reachable (one restarting)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from infermesh import classification
from infermesh.batch_codec import batch_request, split_batch_response
from infermesh.channels import HopChannel
from infermesh.deadline import Deadline
from infermesh.errors import DomainError, Unavailable
from infermesh.method_handlers import TENANT_METADATA, answered_by, error_from_rpc
from infermesh.proto import inference_pb2 as pb
from infermesh.proto import router_pb2
from infermesh.repository import RepositoryState
from infermesh.repository_service import RepositoryClient
from infermesh.retry import RetryBudget, with_retries
from infermesh.segments import InferBatch
from infermesh.statistics import ModelStatistics
from infermesh.tls import ClientTls

READY_CACHE_S = 1.0


class RouterUnreachable(Unavailable):
    """The call got no router's answer (it never reached one, or lost it on the way): the one kind of failure the
    gateway sends again."""


T = TypeVar("T")


class RouterClient:
    def __init__(
        self,
        target: str,
        max_message_bytes: int,
        attempts: int,
        budget_tokens: float = 20.0,
        budget_ratio: float = 0.1,
        tls: ClientTls | None = None,
        streams: int = 0,
        streams_only_when_idle: bool = False,
        unreachable_wait_s: float = 0.0,
    ) -> None:
        self.hop = HopChannel(target, max_message_bytes, tls, streams, streams_only_when_idle)
        self.channel = self.hop.channel
        # No (de)serializers: bytes in, bytes out.
        self._infer = self.hop.internal("/inference.GRPCInferenceService/ModelInfer")
        self._infer_batch = self.hop.internal(
            "/infermesh.router.v1.Router/InferBatch",
            request_serializer=router_pb2.InferBatchRequest.SerializeToString,
            response_deserializer=router_pb2.InferBatchResponse.FromString,
        )
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
        self._repository = RepositoryClient(self.channel, "router")
        self._attempts = attempts
        self._budget = RetryBudget("router", budget_tokens, budget_ratio)
        self._unreachable_wait_s = unreachable_wait_s
        self._ready_at = 0.0
        self._ready = False

    async def _retried(self, call: Callable[[float], Awaitable[T]], deadline: Deadline) -> T:
        """One retry layer in the mesh: the router retries replicas and the feature store itself, so its own
        answers (marked by the method handlers) are final here. Only a call that never got a router's answer
        (connection refused or lost, a router restarting: another router may take it) is sent again, within the
        deadline and the router's retry budget. When that still finds no router, the call waits for a connection
        (a router restarting, e.g. under make run's supervisor) and is sent once more: a restart costs latency,
        not failures. The wait sends nothing, so it cannot storm a struggling router."""

        async def attempt() -> T:
            try:
                return await call(deadline.remaining())
            except grpc.aio.AioRpcError as error:
                translated = error_from_rpc(error, "router")
                if isinstance(translated, Unavailable) and answered_by(error) is None:
                    raise RouterUnreachable(str(translated)) from None
                raise translated from None

        try:
            return await with_retries(
                attempt, deadline, self._attempts, 0.002, 0.05, retry_on=(RouterUnreachable,), budget=self._budget
            )
        except RouterUnreachable:
            # Bounded: the waiting calls hold the gateway's admission slots meanwhile.
            if not await self.hop.connected_within(min(self._unreachable_wait_s, deadline.remaining())):
                raise
        return await attempt()

    async def infer(self, encoded_request: bytes, deadline: Deadline, tenant: str = "") -> bytes:
        # The client's bytes go on unchanged: the tenant travels as internal metadata (the router's prediction
        # log records it; label feedback is authorized against it).
        metadata = ((TENANT_METADATA, tenant),) if tenant else None
        answer: bytes = await self._retried(
            lambda timeout: self._infer(encoded_request, timeout=timeout, metadata=metadata), deadline
        )
        return answer

    async def infer_batch(self, batch: InferBatch, deadline: Deadline) -> list[bytes | DomainError]:
        request = batch_request(batch)
        response = await self._retried(lambda timeout: self._infer_batch(request, timeout=timeout), deadline)
        return split_batch_response(response, batch.segments)

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
        return bool(reply.ready)

    @property
    def repository(self) -> RepositoryState | None:
        return self._repository.state

    async def refresh_repository(self, timeout_s: float) -> bool:
        return await self._repository.refresh(timeout_s)

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None:
        await self._repository.load(model, config_json, deadline)

    async def unload(self, model: str, deadline: Deadline) -> None:
        await self._repository.unload(model, deadline)

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]:
        return await self._repository.statistics(model, version, deadline)

    def flags_of(self, encoded_response: bytes) -> dict[str, str]:
        parameters = pb.ModelInferResponse.FromString(encoded_response).parameters
        return {key: value.string_param for key, value in parameters.items() if key.startswith("infermesh_")}

    def with_flags(self, encoded_response: bytes, flags: dict[str, str]) -> bytes:
        response = pb.ModelInferResponse.FromString(encoded_response)
        for key, value in flags.items():
            response.parameters[key].string_param = value
        return response.SerializeToString()

    def classified(
        self, encoded_response: bytes, classes: Mapping[str, int], batched: bool, labels: Mapping[str, Sequence[str]]
    ) -> bytes:
        response = pb.ModelInferResponse.FromString(encoded_response)
        classification.classify(response, classes, batched, labels)
        return response.SerializeToString()

    async def close(self) -> None:
        await self.hop.close()
