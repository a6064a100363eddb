"""The feature service as a real process, called over a real gRPC channel with the generated stub."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from demo.processes import ServiceProcess
from demo.redis_server import RedisServer
from infermesh.proto import feature_store_pb2 as pb
from infermesh.proto import feature_store_pb2_grpc as pb_grpc
from tests.feature_service.conftest import write_token_digests, writer_channel

PRESENT, NOT_FOUND = pb.PRESENT, pb.NOT_FOUND


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def start_service(run_dir: Path, redis_url: str, views_file: Path, **settings: object) -> ServiceProcess:
    process = ServiceProcess(
        "feature_service",
        "feature_service",
        run_dir,
        {
            "redis_url": redis_url,
            "views_path": views_file,
            "write_token_sha256_file": write_token_digests(run_dir),
            **settings,
        },
    )
    return process.launch()


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, views_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = start_service(tmp_path_factory.mktemp("feature_service"), redis_server.url, views_file)
    yield process
    process.stop()


@pytest.fixture
async def stub(service: ServiceProcess, redis_admin: redis.Redis) -> AsyncIterator[pb_grpc.FeatureStoreStub]:
    async with writer_channel(service.address) as channel:
        yield pb_grpc.FeatureStoreStub(channel)


async def test_write_then_read(stub: pb_grpc.FeatureStoreStub) -> None:
    t = now_ms() - 1_000
    written = await stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="user",
            rows=[
                pb.FeatureRow(entity_id="u1", values={"a": 1.0, "b": 2.0, "c": 3.0}, event_time_ms=t),
                pb.FeatureRow(entity_id="u2", values={"b": 5.0}, event_time_ms=t),
            ],
        )
    )
    assert (written.written, written.skipped_older) == (2, 0)
    older = await stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="user", rows=[pb.FeatureRow(entity_id="u1", values={"a": 9.0}, event_time_ms=t - 1)]
        )
    )
    assert (older.written, older.skipped_older) == (0, 1)

    response = await stub.ReadFeatures(
        pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1", "u2", "nobody"], feature_names=["c", "a"])
    )

    assert response.feature_view == "user"
    assert list(response.feature_names) == ["c", "a"]
    assert list(response.values) == [3.0, 1.0, 0.0, 1.5, 0.0, 1.5]
    assert list(response.statuses) == [PRESENT, PRESENT, NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND]
    ages = list(response.ages_ms)
    assert 1_000 <= ages[0] < 31_000 and ages[1] == ages[0]
    assert ages[2:] == [-1, -1, -1, -1]


async def test_read_all_features_by_default(stub: pb_grpc.FeatureStoreStub) -> None:
    await stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="merchant", rows=[pb.FeatureRow(entity_id="m1", values={"y": 7.0}, event_time_ms=now_ms())]
        )
    )
    response = await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=["m1"]))
    assert list(response.feature_names) == ["x", "y"]
    assert list(response.values) == [10.0, 7.0]
    assert list(response.statuses) == [NOT_FOUND, PRESENT]


async def test_batch_read_is_one_mget(stub: pb_grpc.FeatureStoreStub, command_calls: Callable[[str], int]) -> None:
    t = now_ms()
    await stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="user", rows=[pb.FeatureRow(entity_id="u1", values={"a": 1, "b": 2, "c": 3}, event_time_ms=t)]
        )
    )
    await stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="merchant", rows=[pb.FeatureRow(entity_id="m1", values={"x": 4, "y": 5}, event_time_ms=t)]
        )
    )
    mgets_before = command_calls("mget")

    response = await stub.BatchReadFeatures(
        pb.BatchReadFeaturesRequest(
            reads=[
                pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=["m1", "m2"]),
                pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"], feature_names=["b"]),
            ]
        )
    )

    assert command_calls("mget") - mgets_before == 1
    merchant, user = response.results
    assert merchant.feature_view == "merchant" and list(merchant.values) == [4.0, 5.0, 10.0, 20.0]
    assert list(merchant.statuses) == [PRESENT, PRESENT, NOT_FOUND, NOT_FOUND]
    assert user.feature_view == "user" and list(user.feature_names) == ["b"] and list(user.values) == [2.0]


async def test_list_feature_views(stub: pb_grpc.FeatureStoreStub) -> None:
    response = await stub.ListFeatureViews(pb.ListFeatureViewsRequest())
    views = {view.name: view for view in response.views}
    assert sorted(views) == ["merchant", "user", "wide"]
    user = views["user"]
    assert user.entity_key == "user_id" and user.max_age_ms == 60_000
    assert [(f.name, f.default_value, f.description) for f in user.features] == [
        ("a", 1.5, "first"),
        ("b", -2.0, ""),
        ("c", 0.0, ""),
    ]


@pytest.mark.parametrize(
    ("call", "request_message", "code", "details"),
    [
        ("ReadFeatures", pb.ReadFeaturesRequest(feature_view="nope", entity_ids=["u1"]), "NOT_FOUND",
         "feature view 'nope' not found"),
        ("ReadFeatures", pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"], feature_names=["zz"]),
         "INVALID_ARGUMENT", "feature view 'user' has no features ['zz']"),
        ("ReadFeatures", pb.ReadFeaturesRequest(feature_view="user"), "INVALID_ARGUMENT",
         "read of view 'user': entity_ids is empty"),
        ("BatchReadFeatures", pb.BatchReadFeaturesRequest(
            reads=[pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]),
                   pb.ReadFeaturesRequest(feature_view="nope", entity_ids=["u1"])]),
         "NOT_FOUND", "feature view 'nope' not found"),
        ("WriteFeatures", pb.WriteFeaturesRequest(
            feature_view="user", rows=[pb.FeatureRow(entity_id="u1", values={"q": 1.0}, event_time_ms=1)]),
         "INVALID_ARGUMENT", "feature view 'user' has no features ['q']"),
        ("WriteFeatures", pb.WriteFeaturesRequest(
            feature_view="user", rows=[pb.FeatureRow(entity_id="u1", values={"a": 1.0})]),
         "INVALID_ARGUMENT", "write to view 'user': row 0 event_time_ms must be Unix epoch milliseconds (> 0)"),
    ],
)  # fmt: skip
async def test_error_codes(
    stub: pb_grpc.FeatureStoreStub, call: str, request_message: object, code: str, details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, call)(request_message)
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert caught.value.details() == details


async def test_metrics_count_lookups_by_view(stub: pb_grpc.FeatureStoreStub, service: ServiceProcess) -> None:
    await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="wide", entity_ids=["w1", "w2"]))
    text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{service.metrics_port}/metrics")
    assert 'infermesh_feature_lookups_total{view="wide"} 2.0' in text
    assert 'infermesh_feature_misses_total{view="wide"} 2.0' in text
    assert 'method="ReadFeatures",model="wide"' in text  # requests labelled with the view


async def age_samples(service: ServiceProcess) -> dict[str, float]:
    text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{service.metrics_port}/metrics")
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("infermesh_feature_age_seconds")]
    return {name: float(value) for name, value in lines}


async def test_feature_age_histogram_per_view(stub: pb_grpc.FeatureStoreStub, service: ServiceProcess) -> None:
    """M5: the age of each vector read, per view; entities not found have no age and are not counted."""
    t = now_ms()
    rows = [
        pb.FeatureRow(entity_id="fresh", values={"x": 1.0}, event_time_ms=t - 200),
        pb.FeatureRow(entity_id="old", values={"x": 1.0}, event_time_ms=t - 7_200_000),  # two hours
    ]
    await stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view="merchant", rows=rows))
    before = await age_samples(service)
    await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=["fresh", "old", "none"]))
    after = await age_samples(service)

    def added(sample: str) -> float:
        name = f"infermesh_feature_age_seconds_{sample}"
        return after[name] - before.get(name, 0.0)

    assert added('count{view="merchant"}') == 2
    assert added('bucket{le="0.1",view="merchant"}') == 0
    assert added('bucket{le="1",view="merchant"}') == 1  # fresh: ~0.2 s
    assert added('bucket{le="3600",view="merchant"}') == 1
    assert added('bucket{le="21600",view="merchant"}') == 2  # old: two hours
    assert 7_200 < added('sum{view="merchant"}') < 7_300
    text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{service.metrics_port}/metrics")
    assert 'infermesh_feature_view_max_age_seconds{view="user"} 60.0' in text


def test_sigterm_exits_cleanly(redis_server: RedisServer, views_file: Path, tmp_path: Path) -> None:
    process = start_service(tmp_path, redis_server.url, views_file)
    try:
        assert process.stop() == 0
        assert '"msg": "stopped"' in process.log_tail()
    finally:
        process.kill()


async def test_redis_outage_is_unavailable(views_file: Path, tmp_path: Path) -> None:
    doomed = RedisServer(tmp_path / "redis")
    doomed.start()
    process = start_service(tmp_path / "service", doomed.url, views_file, redis_timeout_s=0.5)
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            request = pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"])
            assert list((await stub.ReadFeatures(request, timeout=5)).statuses) == [NOT_FOUND] * 3
            doomed.kill()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ReadFeatures(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "feature store unavailable"
        assert process.alive
    finally:
        process.stop()
        doomed.stop()


def test_startup_fails_without_views_file(redis_server: RedisServer, tmp_path: Path) -> None:
    process = ServiceProcess(
        "feature_service", "feature_service", tmp_path, {"redis_url": redis_server.url, "views_path": tmp_path / "no"}
    )
    process.start()
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            process.wait_ready(timeout_s=30)
    finally:
        process.kill()


async def test_stream_write_answers_each_batch_in_order(stub: pb_grpc.FeatureStoreStub) -> None:
    t = now_ms()

    def batch(entity: str, value: float, event_time_ms: int) -> pb.WriteFeaturesRequest:
        row = pb.FeatureRow(entity_id=entity, values={"x": value}, event_time_ms=event_time_ms)
        return pb.WriteFeaturesRequest(feature_view="merchant", rows=[row])

    call = stub.StreamWriteFeatures()
    answers = []
    for request in (batch("s1", 1.0, t), batch("s1", 2.0, t - 5), batch("s1", 3.0, t + 5)):
        await call.write(request)
        answers.append(await call.read())  # real-time: each update acknowledged before the next is sent
    await call.done_writing()
    assert [(a.written, a.skipped_older) for a in answers] == [(1, 0), (0, 1), (1, 0)]
    response = await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=["s1"]))
    assert response.values[0] == 3.0  # the newest event won


async def test_stream_write_ends_with_the_status_of_a_bad_batch(stub: pb_grpc.FeatureStoreStub) -> None:
    good = pb.WriteFeaturesRequest(
        feature_view="merchant", rows=[pb.FeatureRow(entity_id="s2", values={"x": 1.0}, event_time_ms=now_ms())]
    )
    bad = pb.WriteFeaturesRequest(
        feature_view="merchant", rows=[pb.FeatureRow(entity_id="s3", values={"nope": 1.0}, event_time_ms=now_ms())]
    )
    call = stub.StreamWriteFeatures(iter([good, bad]))
    first = await call.read()
    assert first.written == 1
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in (failure.value.details() or "")
