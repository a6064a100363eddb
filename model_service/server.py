"""The model service process: loads and warms every model before SERVING; on shutdown stops the batchers."""

from __future__ import annotations

from typing import Any

from infermesh import oip_servicer
from infermesh.service import Service
from model_service.core import ModelServiceCore
from model_service.settings import ModelServiceSettings


class ModelService(Service):
    name = "model_service"

    def __init__(self, settings: ModelServiceSettings) -> None:
        super().__init__(settings)
        self.core = ModelServiceCore(settings)

    async def register(self, server: Any) -> list[str]:
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, self.settings.default_timeout_s), server)
        return [oip_servicer.SERVICE]

    async def warm_up(self) -> None:
        await self.core.load()

    async def before_drain(self) -> None:
        self.core.draining()  # ServerReady/ModelReady turn false while in-flight requests finish

    async def close(self) -> None:
        # After the server drained: anything still queued fails with Unavailable instead of hanging.
        await self.core.close()
