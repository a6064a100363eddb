"""The feature service process: gRPC server lifecycle around one FeatureStore."""

from __future__ import annotations

import logging

import grpc

from feature_service.servicer import SERVICE_NAME, FeatureStoreServicer
from feature_service.settings import FeatureServiceSettings
from feature_service.store import FeatureStore
from feature_service.views import load_views
from infermesh.proto import feature_store_pb2_grpc as pb_grpc
from infermesh.service import Service

log = logging.getLogger(__name__)


class FeatureService(Service):
    name = "feature_service"

    def __init__(self, settings: FeatureServiceSettings) -> None:
        super().__init__(settings)
        self.settings: FeatureServiceSettings = settings
        self.servicer = FeatureStoreServicer(default_timeout_s=settings.default_timeout_s)
        self.store: FeatureStore | None = None

    async def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_FeatureStoreServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def warm_up(self) -> None:
        """Load the views, reach Redis and load the upsert script before reporting SERVING."""
        settings = self.settings
        views = load_views(settings.views_path)
        store = await FeatureStore.open(
            settings.redis_url,
            views,
            timeout_s=settings.redis_timeout_s,
            key_prefix=settings.key_prefix,
            max_entities_per_read=settings.max_entities_per_read,
            max_connections=settings.redis_max_connections,
        )
        self.store = store  # assigned first so close() releases the client even if Redis is down now
        await store.ping()
        if store.clustered:
            log.info("feature store is a Redis Cluster")
        await store.load_scripts()
        self.servicer.store = store
        log.info("feature views loaded", extra={"fields": {"views": sorted(views)}})

    async def close(self) -> None:
        if self.store is not None:
            await self.store.aclose()
