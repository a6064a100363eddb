"""gRPC adapters behind the router core's client protocols: feature service and model replicas."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh import oip, timing
from infermesh.channels import HopChannel
from infermesh.deadline import Deadline
from infermesh.features import FeatureBlock, FeatureQuery
from infermesh.method_handlers import error_from_rpc
from infermesh.priority import DEFAULT_PRIORITY, PRIORITY
from infermesh.proto import feature_store_pb2, feature_store_pb2_grpc, inference_pb2
from infermesh.repository import RepositoryState
from infermesh.repository_service import RepositoryClient
from infermesh.statistics import ModelStatistics
from infermesh.tensors import Tensor
from infermesh.tls import ClientTls
from router.core import ModelAnswer


class FeatureServiceClient:
    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        tls: ClientTls | None = None,
        streams: int = 0,
        streams_only_when_idle: bool = False,
    ) -> None:
        self.hop = HopChannel(address, max_message_bytes, tls, streams, streams_only_when_idle)
        self.channel = self.hop.channel
        self._stub = feature_store_pb2_grpc.FeatureStoreStub(self.channel)
        self._read = self.hop.internal(
            "/infermesh.features.v1.FeatureStore/BatchReadFeatures",
            feature_store_pb2.BatchReadFeaturesRequest.SerializeToString,
            feature_store_pb2.BatchReadFeaturesResponse.FromString,
        )

    async def read(self, queries: Sequence[FeatureQuery], deadline: Deadline) -> list[FeatureBlock]:
        request = feature_store_pb2.BatchReadFeaturesRequest(
            reads=[
                feature_store_pb2.ReadFeaturesRequest(
                    feature_view=q.view, entity_ids=q.entity_ids, feature_names=q.feature_names
                )
                for q in queries
            ]
        )
        try:
            response = await self._read(request, timeout=deadline.remaining())
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, "feature service") from None
        blocks = []
        for query, result in zip(queries, response.results, strict=True):
            shape = (len(query.entity_ids), len(result.feature_names))
            blocks.append(
                FeatureBlock(
                    result.feature_view,
                    tuple(result.feature_names),
                    np.asarray(result.values, dtype=np.float32).reshape(shape),
                    np.asarray(result.statuses, dtype=np.uint8).reshape(shape),
                    np.asarray(result.ages_ms, dtype=np.int64).reshape(shape),
                )
            )
        return blocks

    async def defaults(self, deadline: Deadline) -> dict[str, dict[str, float]]:
        try:
            response = await self._stub.ListFeatureViews(
                feature_store_pb2.ListFeatureViewsRequest(), timeout=deadline.remaining()
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, "feature service") from None
        return {view.name: {f.name: f.default_value for f in view.features} for view in response.views}

    async def close(self) -> None:
        await self.hop.close()


class ModelServiceClient:
    """One replica. Inputs travel raw; outputs are read from raw_output_contents."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        tls: ClientTls | None = None,
        streams: int = 0,
        streams_only_when_idle: bool = False,
    ) -> None:
        self.address = address
        self.hop = HopChannel(address, max_message_bytes, tls, streams, streams_only_when_idle)
        self.channel = self.hop.channel
        self._infer = self.hop.internal(
            "/inference.GRPCInferenceService/ModelInfer",
            inference_pb2.ModelInferRequest.SerializeToString,
            inference_pb2.ModelInferResponse.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._repository = RepositoryClient(self.channel, f"model service {address}")

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> ModelAnswer:
        request = oip.infer_request_message(model, version, inputs)
        if timed:
            request.parameters[timing.TIMING].bool_param = True
        if priority != DEFAULT_PRIORITY:
            request.parameters[PRIORITY].uint64_param = priority
        try:
            response = await self._infer(request, timeout=deadline.remaining())
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, "model service") from None
        spent = {k: v.string_param for k, v in response.parameters.items() if k in timing.PARTS} if timed else {}
        return ModelAnswer(response.model_version, oip.response_outputs(response), spent)

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None:
        await self._repository.load(model, config_json, deadline)

    async def unload(self, model: str, deadline: Deadline) -> None:
        await self._repository.unload(model, deadline)

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]:
        return await self._repository.statistics(model, version, deadline)

    async def repository_state(self, timeout_s: float) -> RepositoryState | None:
        return self._repository.state if await self._repository.refresh(timeout_s) else None

    async def health_check(self, timeout_s: float) -> bool:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.hop.close()
