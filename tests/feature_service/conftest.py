"""Fixtures of the feature service tests: views → private redis-server → store (→ process in the grpc tests)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from demo.redis_server import RedisServer
from feature_service.store import FeatureStore
from feature_service.views import FeatureView, parse_views
from feature_service.writers import write_token_file

# The feature service processes of these tests accept this write token (start_service gives them its digest).
WRITE_TOKEN = "imw_test-writer-token"
WRITER_METADATA = (("authorization", f"Bearer {WRITE_TOKEN}"),)


def write_token_digests(folder: Path) -> Path:
    path = folder / "feature_write_token.sha256"
    write_token_file(path, WRITE_TOKEN)
    return path


def _with_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *WRITER_METADATA)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files each interceptor under one kind only (the first it is an instance of): one class per kind.
class _UnarySendsWriteToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details), request)


class _StreamSendsWriteToken(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details), request_iterator)


def writer_channel(address: str) -> grpc.aio.Channel:
    """A plaintext channel whose every call carries the write token (as a feature writer's would)."""
    return grpc.aio.insecure_channel(address, interceptors=[_UnarySendsWriteToken(), _StreamSendsWriteToken()])


USER_MAX_AGE_MS = 60_000
WIDE_FEATURES = 50

VIEWS_DOCUMENT: dict[str, Any] = {
    "views": [
        {
            "name": "user",
            "entity_key": "user_id",
            "max_age_ms": USER_MAX_AGE_MS,
            "features": [
                {"name": "a", "default": 1.5, "description": "first"},
                {"name": "b", "default": -2.0},
                {"name": "c"},
            ],
        },
        {
            "name": "merchant",
            "entity_key": "merchant_id",
            "max_age_ms": 0,  # never stale
            "features": [{"name": "x", "default": 10.0}, {"name": "y", "default": 20.0}],
        },
        {
            "name": "wide",
            "entity_key": "id",
            "max_age_ms": USER_MAX_AGE_MS,
            "features": [{"name": f"f{i}", "default": float(-i)} for i in range(WIDE_FEATURES)],
        },
    ]
}


@pytest.fixture(scope="session")
def views() -> dict[str, FeatureView]:
    return parse_views(VIEWS_DOCUMENT)


@pytest.fixture(scope="session")
def views_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("views") / "feature_views.json"
    path.write_text(json.dumps(VIEWS_DOCUMENT))
    return path


@pytest.fixture
def redis_admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Synchronous client for set-up and inspection; every test starts from an empty db and zeroed stats."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.config_resetstat()
    yield client
    client.close()


@pytest.fixture
async def store(
    redis_server: RedisServer, redis_admin: redis.Redis, views: dict[str, FeatureView]
) -> AsyncIterator[FeatureStore]:
    feature_store = FeatureStore.connect(redis_server.url, views, timeout_s=2.0)
    await feature_store.load_scripts()
    yield feature_store
    await feature_store.aclose()


@pytest.fixture
def command_calls(redis_admin: redis.Redis) -> Callable[[str], int]:
    """Calls of one Redis command since the test began (INFO commandstats after CONFIG RESETSTAT)."""

    def calls(command: str) -> int:
        stats = redis_admin.info("commandstats").get(f"cmdstat_{command}")
        return int(stats["calls"]) if stats else 0

    return calls
