"""Gateway process."""

from __future__ import annotations

import grpc

from gateway.auth import KeyStore
from gateway.core import GatewayCore
from gateway.router_calls import RouterCalls
from gateway.router_client import RouterClient
from gateway.servicer import SERVICE, GatewayServicer, add_to_server
from gateway.settings import GatewaySettings
from infermesh.model_config import load_repository
from infermesh.service import Service


class GatewayService(Service):
    name = "gateway"
    settings: GatewaySettings

    async def register(self, server: grpc.aio.Server) -> list[str]:
        settings = self.settings
        self.core = GatewayCore(
            load_repository(settings.model_repository), KeyStore.load(settings.api_keys_path), settings.max_inflight
        )
        self.router = RouterClient(settings.router_address, settings.max_message_bytes, settings.router_attempts)
        self.router_calls = RouterCalls(
            self.router,
            settings.coalesce_max_inflight_batches,
            settings.max_inflight,
            settings.coalesce,
            settings.max_message_bytes,
        )
        add_to_server(GatewayServicer(self.core, self.router, self.router_calls, settings.default_timeout_s), server)
        return [SERVICE]

    async def close(self) -> None:
        await self.router_calls.close()
        await self.router.close()
