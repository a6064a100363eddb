"""Gateway process."""

from __future__ import annotations

from typing import Any

from gateway.auth import KeyStore
from gateway.core import GatewayCore
from gateway.router_calls import RouterCalls
from gateway.router_client import RouterClient
from gateway.settings import GatewaySettings
from infermesh import oip_servicer
from infermesh.model_config import load_repository
from infermesh.service import Service


class GatewayService(Service):
    name = "gateway"
    settings: GatewaySettings

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
        self.core = GatewayCore(
            load_repository(settings.model_repository),
            KeyStore.load(settings.api_keys_path),
            settings.max_inflight,
            self.router,
            router_calls,
        )
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, settings.default_timeout_s), server)
        return [oip_servicer.SERVICE]

    async def close(self) -> None:
        await self.core.close()
        await self.router.close()
