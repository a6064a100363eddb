"""Redis commands packed by hiredis: the same bytes as redis-py's own packer, on every connection class."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from demo.redis_server import RedisServer
from feature_service.store import create_redis
from infermesh import prediction_index
from infermesh.redis_packing import pack_command, pack_with_hiredis, packed_by_hiredis

COMMANDS = [
    ("XADD", "preds", "MAXLEN", "~", 100_000, "*", "id", "r-1", "rows", 1, "score", 0.125, "features", "[[1.5]]"),
    ("HSET", b"im:fv:user:u1", b"\x00\xff\x10binary", "ünïcode ✓"),
    ("SET", "k", bytearray(b"from a bytearray")),
    ("SET", "k", memoryview(b"from a memoryview")),
    ("CLIENT SETINFO", "LIB-NAME", "redis-py"),  # a command name of two words is sent as two arguments
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "big", "x" * 200_000),  # larger than redis-py's buffer cutoff: it splits, hiredis does not
    ("DEL", -3, 2**62, 1e-20, float("inf")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_packs_the_same_bytes_as_redis_py(command: tuple[object, ...]) -> None:
    expected = b"".join(Connection().pack_command(*command))  # type: ignore[arg-type]
    assert b"".join(pack_command(*command)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, True, object()])
def test_a_value_redis_cannot_take_is_a_data_error(value: object) -> None:
    with pytest.raises(DataError):
        pack_command("SET", "k", value)  # type: ignore[arg-type]


def test_the_connection_keeps_its_kind() -> None:
    for base in (Connection, SSLConnection, UnixDomainSocketConnection):
        packing = packed_by_hiredis(base)
        assert issubclass(packing, base) and packing is packed_by_hiredis(base)
        assert b"".join(packing().pack_command("GET", "k")) == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    tls = pack_with_hiredis(aioredis.ConnectionPool.from_url("rediss://127.0.0.1:1"))
    assert issubclass(tls.connection_class, SSLConnection)


async def test_the_mesh_clients_pack_with_hiredis_against_a_real_redis(redis_server: RedisServer) -> None:
    log_client = prediction_index.connect(redis_server.url)
    store_client = create_redis(redis_server.url, timeout_s=2.0)
    try:
        for client in (log_client, store_client):
            assert issubclass(client.connection_pool.connection_class, packed_by_hiredis(Connection))
        pipeline = log_client.pipeline(transaction=False)
        fields = {"id": "r-ü", "rows": 3, "score": 0.25, "raw": b"\x00\xffend"}
        pipeline.xadd("packing-test", fields, maxlen=10, approximate=False)  # type: ignore[arg-type]
        pipeline.xadd("packing-test", fields, maxlen=10, approximate=False)  # type: ignore[arg-type]
        await pipeline.execute()
        entries = await store_client.xrange("packing-test")
        assert entries is not None and len(entries) == 2
        assert entries[0][1] == {b"id": "r-ü".encode(), b"rows": b"3", b"score": b"0.25", b"raw": b"\x00\xffend"}
    finally:
        await log_client.delete("packing-test")
        await log_client.aclose()
        await store_client.aclose()
