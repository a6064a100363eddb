"""Gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gateway.auth import KeyStore
from gateway.core import GatewayCore
from gateway.router_calls import RouterCalls
from gateway.router_client import RouterClient
from gateway.settings import GatewaySettings
from infermesh import oip_servicer
from infermesh.model_config import load_repository
from infermesh.service import Service

log = logging.getLogger(__name__)


class GatewayService(Service):
    name = "gateway"
    settings: GatewaySettings
    _reload: asyncio.Task[None] | None = None

    async def register(self, server: Any) -> list[str]:
        settings = self.settings
        self.router = RouterClient(settings.router_address, settings.max_message_bytes, settings.router_attempts)
        router_calls = RouterCalls(
            self.router,
            settings.coalesce_max_inflight_batches,
            settings.max_inflight,
            settings.coalesce,
            settings.max_message_bytes,
        )
        keys = KeyStore.load(
            settings.api_keys_path,
            settings.jwks_path,
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_leeway_s,
        )
        self.core = GatewayCore(
            load_repository(settings.model_repository),
            keys,
            settings.max_inflight,
            self.router,
            router_calls,
            settings.access_log_rate,
        )
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, settings.default_timeout_s), server)
        return [oip_servicer.SERVICE]

    async def warm_up(self) -> None:
        self._reload = asyncio.create_task(self._reload_credentials())

    async def _reload_credentials(self) -> None:
        """Keys and signing keys rotate without a restart: the files are watched (a stat per interval)."""
        while True:
            await asyncio.sleep(self.settings.credentials_reload_s)
            if self.core.keys.reload_if_changed():
                log.info("credentials reloaded")

    async def close(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
        await self.core.close()
        await self.router.close()
