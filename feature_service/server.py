"""The feature service process: gRPC server lifecycle around one FeatureStore."""

from __future__ import annotations

import logging
import ssl

import grpc
from redis.exceptions import AuthenticationError

from feature_service.servicer import SERVICE_NAME, FeatureStoreServicer
from feature_service.settings import FeatureServiceSettings
from feature_service.store import FeatureStore, WritePolicy
from feature_service.views import load_views
from feature_service.writers import WriterPolicy
from infermesh.errors import Unavailable
from infermesh.proto import feature_store_pb2_grpc as pb_grpc
from infermesh.service import Service

log = logging.getLogger(__name__)


class RedisStartError(RuntimeError):
    """The feature service cannot use its Redis at start: the message says why, without the secret."""


def _start_failure(cause: BaseException | None) -> str:
    if isinstance(cause, AuthenticationError):
        return (
            "Redis refused the credentials (wrong password or ACL user): check redis_password_file / "
            "redis_username (FEATURE_SERVICE_REDIS_PASSWORD_FILE, FEATURE_SERVICE_REDIS_USERNAME)"
        )
    if _caused_by_tls(cause):
        return "TLS to Redis failed (its certificate does not verify against redis_ca_file, or Redis speaks no TLS)"
    return f"Redis is unreachable ({type(cause).__name__})"


def _caused_by_tls(error: BaseException | None) -> bool:
    # redis-py reports a failed handshake as a ConnectionError whose cause (or text) is the ssl error.
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, ssl.SSLError) or "SSL" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


class FeatureService(Service):
    name = "feature_service"

    def __init__(self, settings: FeatureServiceSettings) -> None:
        super().__init__(settings)
        self.settings: FeatureServiceSettings = settings
        self.servicer = FeatureStoreServicer(
            default_timeout_s=settings.default_timeout_s,
            writers=WriterPolicy(settings.writers(), settings.write_token_sha256_file),
        )
        if not self.servicer.writers.configured:
            log.warning("no feature writers configured: every write is refused (reads are served)")
        self.store: FeatureStore | None = None

    async def register(self, server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_FeatureStoreServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def warm_up(self) -> None:
        """Load the views, reach Redis and load the upsert script before reporting SERVING."""
        settings = self.settings
        views = load_views(settings.views_path)
        try:
            store = await FeatureStore.open(
                settings.redis_connection_url(),
                views,
                timeout_s=settings.redis_timeout_s,
                key_prefix=settings.key_prefix,
                max_entities_per_read=settings.max_entities_per_read,
                max_connections=settings.redis_max_connections,
                write_policy=WritePolicy(
                    settings.max_future_skew_s, settings.ttl_max_age_multiple, settings.ttl_default_s
                ),
            )
        except Unavailable as error:  # the node the URL names did not answer, or refused us
            raise RedisStartError(_start_failure(error.__cause__)) from None
        self.store = store  # assigned first so close() releases the client even if Redis is down now
        try:
            await store.ping()
        except Unavailable as error:
            raise RedisStartError(_start_failure(error.__cause__)) from None
        if store.clustered:
            log.info("feature store is a Redis Cluster")
        await store.load_scripts()
        self.servicer.store = store
        log.info("feature views loaded", extra={"fields": {"views": sorted(views)}})

    async def close(self) -> None:
        if self.store is not None:
            await self.store.aclose()
