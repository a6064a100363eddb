"""The model service process: loads and warms every model before SERVING; on shutdown stops the batchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from infermesh import oip_servicer, repository_service
from infermesh.service import Service
from model_service.core import ModelServiceCore
from model_service.settings import ModelServiceSettings

log = logging.getLogger(__name__)


class ModelService(Service):
    name = "model_service"
    settings: ModelServiceSettings
    _poll: asyncio.Task[None] | None = None

    def __init__(self, settings: ModelServiceSettings) -> None:
        super().__init__(settings)
        self.core = ModelServiceCore(settings)

    async def register(self, server: Any) -> list[str]:
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, self.settings.default_timeout_s), server)
        repository_service.add_to_server(self.core, server)
        return [oip_servicer.SERVICE, repository_service.SERVICE]

    async def warm_up(self) -> None:
        await self.core.load()
        if self.settings.repository_poll_s > 0:
            self._poll = asyncio.create_task(self._poll_repository())

    async def _poll_repository(self) -> None:
        """Poll mode: what changed in the repository folder is loaded, reloaded or unloaded."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.core.lifecycle.poll()
            except Exception:  # a bad poll (e.g. a folder removed mid-read) must not end polling
                log.exception("repository poll failed")

    async def before_drain(self) -> None:
        self.core.draining()  # ServerReady/ModelReady turn false while in-flight requests finish

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        # After the server drained: anything still queued fails with Unavailable instead of hanging.
        await self.core.close()
