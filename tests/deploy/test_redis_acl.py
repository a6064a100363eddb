"""The ACL user the deployment files create for the mesh, applied to a real redis-server: the feature store's
whole job (seed, script load, upsert, read, ping) works as that user, and nothing beyond its key prefix and
commands does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisServer
from demo.seed import seed_demo_features, write_demo_views
from feature_service.settings import FeatureServiceSettings
from feature_service.store import FeatureStore
from feature_service.views import load_views
from infermesh.proto import feature_store_pb2 as pb
from tests.deploy.artifacts import compose, redis_acl_rule

PASSWORD = "acl-test-password-0123456789"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    folder = tmp_path_factory.mktemp("acl_redis")
    server = RedisServer(folder, password_file=folder / "admin_password")
    server.start()
    rule = redis_acl_rule(compose()["services"]["redis"]["command"][0])  # the same as Kubernetes' (test_compose)
    with redis.Redis.from_url(server.client_url) as admin:
        admin.execute_command("ACL", "SETUSER", "infermesh", "on", f">{PASSWORD}", *rule.split())
    yield server
    server.stop()


def mesh_user_url(server: RedisServer, tmp_path: Path) -> str:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    return FeatureServiceSettings(
        redis_url=server.url, redis_username="infermesh", redis_password_file=password_file
    ).redis_connection_url()


async def test_the_mesh_user_does_the_feature_stores_work(acl_redis: RedisServer, tmp_path: Path) -> None:
    url = mesh_user_url(acl_redis, tmp_path)
    views_path = tmp_path / "feature_views.json"
    write_demo_views(views_path)
    written = await seed_demo_features(url, views_path)  # SCRIPT LOAD + EVALSHA (GET/SET inside) under im:
    assert written["user"] > 0
    store = FeatureStore.connect(url, load_views(views_path))
    try:
        await store.ping()
        block = await store.read("user", ["u1", "nobody"])
        assert (block.statuses[0] == pb.PRESENT).all(), "u1 was seeded as the mesh user"
        assert (block.statuses[1] == pb.NOT_FOUND).all()
    finally:
        await store.aclose()


def test_the_mesh_user_can_do_nothing_else(acl_redis: RedisServer, tmp_path: Path) -> None:
    with redis.Redis.from_url(mesh_user_url(acl_redis, tmp_path)) as client:
        assert client.ping()
        client.set("im:fv:user:probe", b"x")  # its own prefix
        for denied in (
            lambda: client.get("other:key"),  # another application's keys
            lambda: client.set("session:1", b"x"),
            lambda: client.keys("*"),
            lambda: client.flushall(),
            lambda: client.config_get("requirepass"),
            lambda: client.acl_list(),
            lambda: client.delete("im:fv:user:probe"),  # the store never deletes
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
