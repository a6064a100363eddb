"""Feature writes are locked: only authorized writers (a write token, or a writer's client certificate under mutual
TLS), no event time far in the future, only finite values, and every key with a TTL from its view's max_age. Real
feature service processes, a real redis-server, real TLS."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from demo.certs import make_certs
from demo.processes import ServiceProcess
from demo.redis_server import RedisServer
from infermesh.proto import feature_store_pb2 as pb
from infermesh.proto import feature_store_pb2_grpc as pb_grpc
from tests.feature_service.conftest import USER_MAX_AGE_MS, writer_channel
from tests.feature_service.test_feature_service_grpc import start_service

TTL_MULTIPLE = 10


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def row(entity: str, values: dict[str, float], event_time_ms: int | None = None) -> pb.FeatureRow:
    return pb.FeatureRow(entity_id=entity, values=values, event_time_ms=event_time_ms or now_ms())


def snapshot(client: redis.Redis) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key with its value and its remaining TTL in whole seconds: what a refused write must leave alone."""
    return {key: (client.get(key), client.ttl(key)) for key in client.keys("*")}


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, views_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = start_service(
        tmp_path_factory.mktemp("feature_writes"),
        redis_server.url,
        views_file,
        max_future_skew_s=60,
        ttl_max_age_multiple=TTL_MULTIPLE,
    )
    yield process
    process.stop()


@pytest.fixture
async def writer(service: ServiceProcess, redis_admin: redis.Redis) -> AsyncIterator[pb_grpc.FeatureStoreStub]:
    async with writer_channel(service.address) as channel:
        yield pb_grpc.FeatureStoreStub(channel)


async def test_far_future_and_non_finite_rows_are_refused_and_nothing_stored_changes(
    writer: pb_grpc.FeatureStoreStub, redis_admin: redis.Redis
) -> None:
    await writer.WriteFeatures(pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 1.0, "b": 2.0})]))
    before = snapshot(redis_admin)
    forged = now_ms() + 3_600_000  # an hour ahead: it would beat every genuine write for an hour
    refusals = {
        "far future": (
            [row("u2", {"a": 5.0}), row("u1", {"a": 9.0}, forged)],
            "row 1 (entity 'u1') has event_time_ms",
        ),
        "NaN": ([row("u2", {"a": 5.0}), row("u1", {"b": float("nan")})], "non-finite values"),
        "+inf": ([row("u2", {"a": 5.0}), row("u1", {"c": float("inf")})], "for ['c']"),
        "-inf": ([row("u1", {"a": float("-inf")})], "for ['a']"),
    }
    for case, (rows, expected) in refusals.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await writer.WriteFeatures(pb.WriteFeaturesRequest(feature_view="user", rows=rows))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert expected in (refused.value.details() or ""), case
    # The stream refuses a forged batch the same way, and ends with its status.
    call = writer.StreamWriteFeatures(
        iter([pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 9.0}, forged)])])
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entity 'u1'" in (refused.value.details() or "")

    assert snapshot(redis_admin) == before  # not even the good rows of a refused call (u2) were written
    response = await writer.ReadFeatures(pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]))
    assert list(response.values)[:2] == [1.0, 2.0]


async def test_an_event_time_within_the_allowed_skew_is_written(
    writer: pb_grpc.FeatureStoreStub, redis_admin: redis.Redis
) -> None:
    ahead = now_ms() + 30_000  # a writer's clock 30 s ahead: inside the 60 s allowed
    written = await writer.WriteFeatures(
        pb.WriteFeaturesRequest(feature_view="user", rows=[row("u3", {"a": 3.0}, ahead)])
    )
    assert written.written == 1


async def test_keys_get_a_ttl_of_the_views_max_age_times_the_multiple(
    writer: pb_grpc.FeatureStoreStub, redis_admin: redis.Redis
) -> None:
    t = now_ms()
    await writer.WriteFeatures(pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 1.0}, t)]))
    await writer.WriteFeatures(pb.WriteFeaturesRequest(feature_view="merchant", rows=[row("m1", {"x": 1.0}, t)]))
    expected_ms = USER_MAX_AGE_MS * TTL_MULTIPLE
    user_ttl = redis_admin.pttl("im:fv:user:u1")
    assert expected_ms - 10_000 < user_ttl <= expected_ms
    assert redis_admin.ttl("im:fv:merchant:m1") == -1  # max_age 0 (never stale) and no ttl_default_s: no TTL

    # An older row is skipped and leaves the key's TTL alone; a newer one sets it again, in the same script call.
    redis_admin.pexpire("im:fv:user:u1", 5_000)
    skipped = await writer.WriteFeatures(
        pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 2.0}, t - 1)])
    )
    assert skipped.skipped_older == 1 and redis_admin.pttl("im:fv:user:u1") <= 5_000
    await writer.WriteFeatures(pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"b": 2.0}, t + 1)]))
    assert redis_admin.pttl("im:fv:user:u1") > expected_ms - 10_000
    # The streamed writes too.
    call = writer.StreamWriteFeatures(
        iter([pb.WriteFeaturesRequest(feature_view="user", rows=[row("u9", {"a": 1.0})])])
    )
    assert (await call.read()).written == 1
    assert redis_admin.pttl("im:fv:user:u9") > expected_ms - 10_000


async def test_writes_without_an_accepted_token_are_refused_and_reads_stay_open(
    service: ServiceProcess, redis_admin: redis.Redis
) -> None:
    request = pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 1.0})])
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = pb_grpc.FeatureStoreStub(channel)
        for metadata, code, details in [
            ((), grpc.StatusCode.UNAUTHENTICATED, "feature writes need a write token"),
            ((("authorization", "Bearer imw_not-the-token"),), grpc.StatusCode.UNAUTHENTICATED, "not accepted"),
            ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED, "must be 'Bearer <write token>'"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WriteFeatures(request, metadata=metadata)
            assert (refused.value.code(), details in (refused.value.details() or "")) == (code, True)
            # The stream is refused on its metadata, before any batch (a batch written meanwhile would race the
            # refusal in grpc.aio's client, which then reports INTERNAL for the failed write instead).
            stream = stub.StreamWriteFeatures(metadata=metadata)
            assert await stream.code() == code
        assert "imw_not-the-token" not in service.log_path.read_text()  # a token never reaches the log
        response = await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]))
        assert list(response.statuses) == [pb.NOT_FOUND] * 3
    assert redis_admin.dbsize() == 0


async def test_without_configured_writers_every_write_is_permission_denied(
    redis_server: RedisServer, redis_admin: redis.Redis, views_file: Path, tmp_path: Path
) -> None:
    process = ServiceProcess(
        "feature_service", "feature_service", tmp_path, {"redis_url": redis_server.url, "views_path": views_file}
    ).launch()
    try:
        async with writer_channel(process.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.FeatureStoreStub(channel).WriteFeatures(
                    pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 1.0})])
                )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "feature writes are disabled" in (refused.value.details() or "")
    finally:
        process.stop()
    assert redis_admin.dbsize() == 0


def _mtls_channel(address: str, certs: Path, who: str) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / f"{who}.key").read_bytes(), (certs / f"{who}.pem").read_bytes()
    )
    return grpc.aio.secure_channel(address, credentials)


async def test_under_mutual_tls_the_writers_certificate_may_write_and_others_only_read(
    redis_server: RedisServer, redis_admin: redis.Redis, views_file: Path, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    process = ServiceProcess(
        "feature_service",
        "feature_service",
        tmp_path,
        {
            "redis_url": redis_server.url,
            "views_path": views_file,
            "tls_cert_file": certs / "feature_service.pem",
            "tls_key_file": certs / "feature_service.key",
            "tls_ca_file": certs / "ca.pem",
            "writer_identities": "client, feature-writer",  # the demo's `client` certificate (its CN) writes
        },
    ).launch()
    request = pb.WriteFeaturesRequest(feature_view="user", rows=[row("u1", {"a": 4.0})])
    try:
        async with _mtls_channel(process.address, certs, "router") as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WriteFeatures(request)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert redis_admin.dbsize() == 0
            read = await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]))
            assert list(read.statuses) == [pb.NOT_FOUND] * 3  # the router reads
        async with _mtls_channel(process.address, certs, "client") as channel:
            written = await pb_grpc.FeatureStoreStub(channel).WriteFeatures(request)
        assert written.written == 1 and redis_admin.exists("im:fv:user:u1")
    finally:
        process.stop()
