"""The feature store through Redis Sentinel: a primary, its replica and a sentinel, all real; then a failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from demo.redis_server import RedisSentinelServer, RedisServer
from feature_service.store import FeatureStore, parse_sentinel_url
from feature_service.views import FeatureView
from infermesh.errors import Unavailable
from infermesh.features import FeatureStatus


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisSentinelServer]]:
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    replica.start()
    sentinel = RedisSentinelServer(tmp_path / "sentinel", primary.port)
    try:
        sentinel.start()
        yield primary, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        primary.stop()


def test_sentinel_url_parsing() -> None:
    assert parse_sentinel_url("redis+sentinel://:pw@h1:26379,h2:26380/features/2") == (
        [("h1", 26379), ("h2", 26380)],
        "features",
        2,
        "pw",
    )
    with pytest.raises(ValueError, match="service_name"):
        parse_sentinel_url("redis+sentinel://h1:26379")
    with pytest.raises(ValueError, match="host:port"):
        parse_sentinel_url("redis+sentinel://h1/features")


def wait_until(condition: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)  # poll the topology
    raise AssertionError("condition not reached in time")


async def test_reads_and_writes_follow_a_failover(
    sentinel_setup: tuple[RedisServer, RedisServer, RedisSentinelServer], views: dict[str, FeatureView]
) -> None:
    primary, replica, sentinel = sentinel_setup
    store = await FeatureStore.open(sentinel.url, views, timeout_s=1.0)
    try:
        assert not store.clustered
        await store.load_scripts()
        result = await store.write("user", [("u1", {"a": 1.0, "b": 2.0, "c": 3.0}, now_ms())])
        assert result.written == 1
        with redis.Redis(host="127.0.0.1", port=replica.port) as client:
            wait_until(lambda: client.exists(store.key("user", "u1")))  # replicated before the primary goes

        with redis.Redis(host="127.0.0.1", port=sentinel.port) as client:
            client.execute_command("SENTINEL", "FAILOVER", sentinel.service)
        wait_until(lambda: sentinel.primary_port_now() == replica.port)
        with redis.Redis(host="127.0.0.1", port=replica.port) as client:
            wait_until(lambda: client.info("replication")["role"] == "master")
        with redis.Redis(host="127.0.0.1", port=primary.port) as client:
            wait_until(lambda: client.info("replication")["role"] == "slave")  # sentinel demoted the old one

        # The pool asks the sentinel again: reads and writes now go to the promoted replica.
        block = None
        deadline = time.monotonic() + 30
        while block is None and time.monotonic() < deadline:
            try:
                await store.write("user", [("u2", {"a": 5.0}, now_ms())])
                block = await store.read("user", ["u1", "u2"], ["a"])
            except Unavailable:
                await asyncio.sleep(0.1)  # the old primary's connections fail once while it turns replica
        assert block is not None, "the store never reached the new primary"
        assert block.values.tolist() == [[1.0], [5.0]]
        assert (block.statuses == FeatureStatus.PRESENT).all()
        with redis.Redis(host="127.0.0.1", port=replica.port) as client:
            assert client.exists(store.key("user", "u2"))  # written on the new primary
    finally:
        await store.aclose()
