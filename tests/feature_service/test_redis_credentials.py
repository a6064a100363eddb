"""The feature service against a Redis that requires a password (as `make run`'s does) and one that speaks only
TLS: the right credentials work, wrong ones stop the start with a clear message that holds no secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from demo.certs import make_certs
from demo.processes import ServiceProcess
from demo.redis_server import RedisServer, supports_tls
from feature_service.settings import FeatureServiceSettings
from infermesh.proto import feature_store_pb2 as pb
from infermesh.proto import feature_store_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    folder = tmp_path_factory.mktemp("locked_redis")
    server = RedisServer(folder, password_file=folder / "password")
    server.start()
    yield server
    server.stop()


def feature_service(run_dir: Path, views_file: Path, **settings: object) -> ServiceProcess:
    return ServiceProcess("feature_service", "feature_service", run_dir, {"views_path": views_file, **settings})


def test_the_generated_password_is_private_and_required(locked_redis: RedisServer) -> None:
    assert locked_redis.password_file is not None
    assert os.stat(locked_redis.password_file).st_mode & 0o777 == 0o600
    password = locked_redis.password_file.read_text()
    assert len(password) >= 32
    with redis.Redis.from_url(locked_redis.url) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(locked_redis.client_url) as client:
        assert client.ping()
    # Off the command line: what `ps` shows of redis-server holds no password.
    assert locked_redis.process is not None
    command_line = Path(f"/proc/{locked_redis.process.pid}/cmdline").read_bytes()
    assert password.encode() not in command_line


async def test_the_right_password_file_serves(locked_redis: RedisServer, views_file: Path, tmp_path: Path) -> None:
    assert locked_redis.password_file is not None
    process = feature_service(
        tmp_path, views_file, redis_url=locked_redis.url, redis_password_file=locked_redis.password_file
    )
    process.launch()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            reply = await pb_grpc.FeatureStoreStub(channel).ReadFeatures(
                pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]), timeout=5
            )
        assert list(reply.statuses) == [pb.NOT_FOUND] * 3  # read from Redis: the entity is not there
    finally:
        process.stop()
    assert locked_redis.password_file.read_text() not in process.log_tail(400)


def test_a_wrong_password_stops_the_start_with_a_clear_error(
    locked_redis: RedisServer, views_file: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong_password"
    wrong.write_text("not-the-password-0123456789")
    process = feature_service(tmp_path, views_file, redis_url=locked_redis.url, redis_password_file=wrong)
    process.start()
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            process.wait_ready(timeout_s=30)
    finally:
        process.kill()
    log = process.log_tail(400)
    assert "Redis refused the credentials (wrong password or ACL user)" in log
    assert "not-the-password-0123456789" not in log


def test_the_connection_url_folds_in_credentials_and_tls_files(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("p@ss/word:1\n")
    settings = FeatureServiceSettings(
        redis_url="rediss://redis.infermesh.svc:6380/0",
        redis_username="infermesh",
        redis_password_file=password_file,
        redis_ca_file=tmp_path / "ca.pem",
    )
    url = settings.redis_connection_url()
    assert url == (
        "rediss://infermesh:p%40ss%2Fword%3A1@redis.infermesh.svc:6380/0?ssl_ca_certs="
        + str(tmp_path / "ca.pem").replace("/", "%2F")
    )
    kwargs = redis.connection.parse_url(url)
    assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["port"]) == (
        "infermesh",
        "p@ss/word:1",
        "redis.infermesh.svc",
        6380,
    )
    assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    # URL credentials alone still work; the file wins over them.
    assert FeatureServiceSettings(redis_url="redis://u:pw@h:1/0").redis_connection_url() == "redis://u:pw@h:1/0"
    assert FeatureServiceSettings(
        redis_url="redis://u:pw@h:1/0", redis_password_file=password_file
    ).redis_connection_url() == ("redis://u:p%40ss%2Fword%3A1@h:1/0")


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that speaks only TLS, with a password (as `TLS=1 make run` starts it)."""
    if not supports_tls():
        pytest.skip("this redis-server was built without TLS")
    folder = tmp_path_factory.mktemp("tls_redis")
    server = RedisServer(folder, password_file=folder / "password", tls_dir=make_certs(folder / "certs"))
    server.start()
    yield server
    server.stop()


async def test_rediss_with_the_ca_serves_and_without_it_fails_clearly(
    tls_redis: RedisServer, views_file: Path, tmp_path: Path
) -> None:
    assert tls_redis.url.startswith("rediss://") and tls_redis.password_file is not None
    credentials = {"redis_url": tls_redis.url, "redis_password_file": tls_redis.password_file}
    process = feature_service(tmp_path / "with_ca", views_file, **credentials, redis_ca_file=tls_redis.ca_file)
    process.launch()
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            reply = await pb_grpc.FeatureStoreStub(channel).ReadFeatures(
                pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]), timeout=5
            )
        assert list(reply.statuses) == [pb.NOT_FOUND] * 3
    finally:
        process.stop()
    # Without the CA the Redis certificate does not verify (the system's CAs did not sign it).
    unverified = feature_service(tmp_path / "without_ca", views_file, **credentials)
    unverified.start()
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            unverified.wait_ready(timeout_s=30)
    finally:
        unverified.kill()
    assert "TLS to Redis failed" in unverified.log_tail(400)
