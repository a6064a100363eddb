"""The ACL users the deployment files create, applied to a real redis-server: the feature store's whole job (seed,
script load, upsert, read, ping) works as `infermesh`, the router's prediction log as `prediction-log` and the
gateway's label feedback as `feedback`, and nothing beyond each one's keys and commands does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from demo.redis_server import RedisServer
from demo.seed import seed_demo_features, write_demo_views
from feature_service.settings import FeatureServiceSettings
from feature_service.store import FeatureStore
from feature_service.views import load_views
from gateway.settings import GatewaySettings
from infermesh import prediction_index
from infermesh.model_config import ModelConfig
from infermesh.proto import feature_store_pb2 as pb
from infermesh.tensors import Tensor
from router.prediction_log import LoggedRequest, PredictionLog
from router.settings import RouterSettings
from tests.deploy.artifacts import (
    FEEDBACK_USER,
    MESH_USER,
    PREDICTION_LOG_USER,
    compose,
    compose_env,
    redis_acl_rules,
)

PASSWORD = "acl-test-password-0123456789"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    folder = tmp_path_factory.mktemp("acl_redis")
    server = RedisServer(folder, password_file=folder / "admin_password")
    server.start()
    # The same rules as Kubernetes' (test_compose), each user with its own password.
    rules = redis_acl_rules(compose()["services"]["redis"]["command"][0])
    assert set(rules) == {MESH_USER, PREDICTION_LOG_USER, FEEDBACK_USER}
    with redis.Redis.from_url(server.client_url) as admin:
        for user, rule in rules.items():
            admin.execute_command("ACL", "SETUSER", user, "on", f">{PASSWORD}{user}", *rule.split())
    yield server
    server.stop()


def mesh_user_url(server: RedisServer, tmp_path: Path) -> str:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + MESH_USER)
    return FeatureServiceSettings(
        redis_url=server.url, redis_username=MESH_USER, redis_password_file=password_file
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


# ------------------------------------------------------------------------------------------------ prediction log


def compose_settings(service: str) -> dict[str, str]:
    return compose_env(compose()["services"][service])


def user_url(server: RedisServer, user: str) -> str:
    """The deployment's URL form (the ACL user in it, the password from a file) on the test's plain Redis."""
    return server.url.replace("redis://", f"redis://{user}@")


def password_file(tmp_path: Path, user: str) -> Path:
    path = tmp_path / f"{user}.password"
    path.write_text(PASSWORD + user + "\n")
    return path


FRAUD_LIKE = ModelConfig.model_validate(
    {
        "name": "m",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
        "monitoring": {"log_sample_rate": 1.0},
    }
)


async def test_the_router_logs_and_the_gateway_joins_labels_as_their_users(
    acl_redis: RedisServer, tmp_path: Path
) -> None:
    router_env, gateway_env = compose_settings("router"), compose_settings("gateway")
    stream = str(RouterSettings.model_fields["prediction_log_stream"].default)
    assert router_env.get("ROUTER_PREDICTION_LOG_STREAM", stream) == stream  # the stream the ACL rules name
    settings = RouterSettings(
        prediction_log_redis_url=user_url(acl_redis, PREDICTION_LOG_USER),
        prediction_log_redis_password_file=password_file(tmp_path, PREDICTION_LOG_USER),
        prediction_log_max_len=int(router_env["ROUTER_PREDICTION_LOG_MAX_LEN"]),
        prediction_log_index_ttl_s=int(router_env["ROUTER_PREDICTION_LOG_INDEX_TTL_S"]),
    )
    assert settings.prediction_log_redis_password_file is not None
    # As router.server.open_prediction_log builds it (not imported here: its gRPC stubs clash with tritonclient's
    # in one pytest process).
    log = PredictionLog(
        prediction_index.connect(
            settings.prediction_log_redis_url, settings.prediction_log_redis_password_file.read_text().strip()
        ),
        b"k" * 32,
        stream=settings.prediction_log_stream,
        max_len=settings.prediction_log_max_len,
        index_ttl_s=settings.prediction_log_index_ttl_s,
    )
    with redis.Redis.from_url(acl_redis.client_url) as admin:
        admin.config_resetstat()
    data = np.array([0.9, 0.1], dtype=np.float32)
    sampled = [LoggedRequest(f"acl-{i}", (i, i + 1), {}, {"user_id": [f"u{i}"]}, None, {}, "demo") for i in range(2)]
    log.record(FRAUD_LIKE, "1", sampled, {"p": Tensor("p", "FP32", data.shape, data)})
    await log.flush()
    await log.close()
    with redis.Redis.from_url(acl_redis.client_url) as admin:  # what the writes did, seen by the admin
        assert admin.xlen(stream) == 2, "XADD as prediction-log"
        stats = admin.info("commandstats")
        evalsha = stats["cmdstat_evalsha"]  # a first call may fail NOSCRIPT (the client then loads the script)
        assert evalsha["calls"] - evalsha["failed_calls"] == 1, "the batch in one call of the log's script"
        assert "cmdstat_hset" in stats and stats["cmdstat_hset"]["calls"] == 2
        ttl = admin.ttl(prediction_index.index_key(stream, "acl-0"))
        assert 0 < ttl <= int(router_env["ROUTER_PREDICTION_LOG_INDEX_TTL_S"]), "HSET + EXPIRE of the index"
    gateway = GatewaySettings(
        feedback_redis_url=user_url(acl_redis, FEEDBACK_USER),
        feedback_redis_password_file=password_file(tmp_path, FEEDBACK_USER),
    )
    assert gateway_env.get("GATEWAY_FEEDBACK_STREAM", gateway.feedback_stream) == stream
    assert gateway.feedback_redis_password_file is not None
    feedback = prediction_index.connect(
        gateway.feedback_redis_url, gateway.feedback_redis_password_file.read_text().strip()
    )
    try:
        found = await prediction_index.lookup(feedback, stream, ["acl-0", "acl-1", "nobody"])
        assert [entry.tenant if entry else None for entry in found] == ["demo", "demo", None]
        marks = await prediction_index.mark_labelled(feedback, stream, [("acl-0", 1.0), ("acl-0", 1.0), ("no", 0.0)])
        assert marks == [prediction_index.MARKED, prediction_index.LABELLED_BEFORE, prediction_index.GONE]
    finally:
        await feedback.aclose()


def test_the_prediction_log_users_can_do_nothing_else(acl_redis: RedisServer, tmp_path: Path) -> None:
    stream = "infermesh:predictions"
    index = prediction_index.index_key(stream, "probe")
    with redis.Redis.from_url(acl_redis.client_url) as admin:
        admin.hset(index, "model", "m")
        admin.set("im:fv:user:u1", b"x")
        forging = admin.script_load("return redis.call('SET', KEYS[1], 'forged')")
    log_user = redis.Redis.from_url(user_url(acl_redis, PREDICTION_LOG_USER), password=PASSWORD + PREDICTION_LOG_USER)
    feedback_user = redis.Redis.from_url(user_url(acl_redis, FEEDBACK_USER), password=PASSWORD + FEEDBACK_USER)
    with log_user, feedback_user:
        log_user.xadd(stream, {"a": "b"}, maxlen=10, approximate=True)
        assert feedback_user.hgetall(index) == {b"model": b"m"}
        for denied in (
            lambda: log_user.get("im:fv:user:u1"),  # the features
            lambda: log_user.set("im:fv:user:u1", b"forged"),
            lambda: log_user.xrange(stream),  # it writes the log; reading it is someone else's job
            lambda: log_user.hgetall(index),
            lambda: log_user.delete(stream),
            lambda: log_user.xadd("other:stream", {"a": "b"}),
            lambda: log_user.keys("*"),
            lambda: log_user.flushall(),
            lambda: log_user.config_get("maxmemory"),
            lambda: log_user.eval("return 1", 0),  # its own script by EVALSHA only
            lambda: log_user.evalsha(forging, 1, "im:fv:user:u1"),  # a loaded script runs under its rules
            lambda: log_user.evalsha(forging, 1, index),
            lambda: feedback_user.xadd(stream, {"forged": "1"}),  # no forged predictions
            lambda: feedback_user.hset(index, "score", "1"),
            lambda: feedback_user.xrange(stream),
            lambda: feedback_user.get("im:fv:user:u1"),
            lambda: feedback_user.delete(index),
            lambda: feedback_user.keys("*"),
            lambda: feedback_user.acl_list(),
            # EVAL runs only the commands and keys the user has: no way around the rules through a script.
            lambda: feedback_user.eval("return redis.call('SET', KEYS[1], 'x')", 1, "im:fv:user:u1"),
            lambda: feedback_user.eval("return redis.call('DEL', KEYS[1])", 1, index),
            lambda: feedback_user.eval("return redis.call('EXISTS', KEYS[1])", 1, "im:fv:user:u1"),
        ):
            # NOPERM, or (inside a script) "The user executing the script can't run this command / access ..."
            with pytest.raises(redis.exceptions.ResponseError, match=r"(?i)no permissions|user executing the script"):
                denied()
