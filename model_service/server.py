"""The model service process: loads and warms every model before SERVING; on shutdown stops the batchers."""

from __future__ import annotations

import grpc

from infermesh.proto import inference_pb2_grpc
from infermesh.service import Service
from model_service.core import ModelServiceCore
from model_service.servicer import SERVICE_NAME, InferenceServicer
from model_service.settings import ModelServiceSettings


class ModelService(Service):
    name = "model_service"

    def __init__(self, settings: ModelServiceSettings) -> None:
        super().__init__(settings)
        self.core = ModelServiceCore(settings)

    async def register(self, server: grpc.aio.Server) -> list[str]:
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.core), server)
        return [SERVICE_NAME]

    async def warm_up(self) -> None:
        await self.core.load()

    async def before_drain(self) -> None:
        self.core.draining()  # ServerReady/ModelReady turn false while in-flight requests finish

    async def close(self) -> None:
        # After the server drained: anything still queued fails with Unavailable instead of hanging.
        await self.core.close()
