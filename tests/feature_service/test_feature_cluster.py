"""The feature store on a real local Redis Cluster (three masters started here), including a shard outage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis

from demo import synthetic
from demo.redis_server import RedisClusterServers
from demo.seed import seed_demo_features, write_demo_views
from feature_service.store import FeatureStore
from feature_service.views import FeatureView
from infermesh.errors import Unavailable
from infermesh.features import FeatureStatus
from infermesh.proto import feature_store_pb2 as pb
from infermesh.proto import feature_store_pb2_grpc as pb_grpc
from tests.feature_service.conftest import writer_channel
from tests.feature_service.test_feature_service_grpc import start_service

ENTITIES = [f"u{i}" for i in range(60)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(tmp_path_factory.mktemp("cluster"), shards=3)
    servers.start()
    yield servers
    servers.stop()


def calls(node_url: str, command: str) -> int:
    with redis.Redis.from_url(node_url) as client:
        stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def reset_stats(cluster: RedisClusterServers) -> None:
    for url in cluster.urls:
        with redis.Redis.from_url(url) as client:
            client.config_resetstat()


@pytest.fixture
async def cluster_store(cluster: RedisClusterServers, views: dict[str, FeatureView]) -> AsyncIterator[FeatureStore]:
    cluster.flushall()
    store = await FeatureStore.open(cluster.nodes[1].url, views, timeout_s=1.0)  # any node's URL will do
    await store.load_scripts()
    yield store
    await store.aclose()


async def write_users(store: FeatureStore, event_time_ms: int) -> None:
    rows = [(entity, {"a": float(i), "b": float(-i), "c": 0.5}, event_time_ms) for i, entity in enumerate(ENTITIES)]
    result = await store.write("user", rows)
    assert (result.written, result.skipped_older) == (len(ENTITIES), 0)


async def test_cluster_detected_and_keys_spread_over_every_shard(
    cluster: RedisClusterServers, cluster_store: FeatureStore
) -> None:
    assert cluster_store.clustered
    await write_users(cluster_store, now_ms())
    for url in cluster.urls:
        with redis.Redis.from_url(url) as client:
            assert client.dbsize() > 0, f"no keys on {url}: the rows were not spread over the shards"
    reset_stats(cluster)  # the upsert script's own GETs count too

    block = await cluster_store.read("user", [*ENTITIES, "nobody"], ["b", "a"])

    assert block.values[:-1].tolist() == [[float(-i), float(i)] for i in range(len(ENTITIES))]
    assert block.statuses[-1].tolist() == [FeatureStatus.NOT_FOUND] * 2
    assert (block.statuses[:-1] == FeatureStatus.PRESENT).all()
    # One pipelined round trip per shard: GETs on every node, never a cross-slot MGET.
    assert all(calls(url, "get") > 0 for url in cluster.urls)
    assert sum(calls(url, "get") for url in cluster.urls) == len(ENTITIES) + 1
    assert sum(calls(url, "mget") for url in cluster.urls) == 0


async def test_cluster_upserts_are_last_write_wins_per_row(cluster_store: FeatureStore) -> None:
    t = now_ms()
    await write_users(cluster_store, t)
    older = await cluster_store.write("user", [("u1", {"a": 99.0}, t - 1), ("u2", {"a": 98.0}, t + 1)])
    assert (older.written, older.skipped_older) == (1, 1)
    again = await cluster_store.write("user", [("u2", {"a": 98.0}, t + 1)])  # idempotent: same event re-applies
    assert (again.written, again.skipped_older) == (1, 0)

    block = await cluster_store.read("user", ["u1", "u2"])

    assert block.values.tolist() == [[1.0, -1.0, 0.5], [98.0, -2.0, 0.5]]  # u2 partial: b and c merged


async def test_shard_outage_is_unavailable_then_recovers(
    cluster: RedisClusterServers, cluster_store: FeatureStore
) -> None:
    await write_users(cluster_store, now_ms())
    lost = cluster.shard_of(cluster_store.key("user", ENTITIES[0]))
    kept = [e for e in ENTITIES if cluster.shard_of(cluster_store.key("user", e)) is not lost]
    gone = [e for e in ENTITIES if cluster.shard_of(cluster_store.key("user", e)) is lost]
    assert kept and gone

    lost.kill()
    try:
        with pytest.raises(Unavailable, match="feature store unavailable"):
            await cluster_store.read("user", ENTITIES)
        # The other shards keep serving their own keys meanwhile.
        survivors = await cluster_store.read("user", kept)
        assert (survivors.statuses == FeatureStatus.PRESENT).all()
    finally:
        cluster.restart_shard(lost)

    # Back in the cluster, empty (no persistence here): its keys read NOT_FOUND, the rest PRESENT.
    block = await cluster_store.read("user", ENTITIES)
    present = {e for e, row in zip(ENTITIES, block.statuses.tolist(), strict=True) if row[0] == FeatureStatus.PRESENT}
    assert present == set(kept)
    await write_users(cluster_store, now_ms())  # the restarted shard's script cache is empty: reloaded on NOSCRIPT
    block = await cluster_store.read("user", gone)
    assert (block.statuses == FeatureStatus.PRESENT).all()


async def test_feature_service_process_on_a_cluster(
    cluster: RedisClusterServers, views_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster.flushall()
    process = start_service(tmp_path_factory.mktemp("cluster_service"), cluster.nodes[2].url, views_file)
    try:
        async with writer_channel(process.address) as channel:
            stub = pb_grpc.FeatureStoreStub(channel)
            rows = [pb.FeatureRow(entity_id=e, values={"x": 1.0, "y": 2.0}, event_time_ms=now_ms()) for e in ENTITIES]
            written = await stub.WriteFeatures(pb.WriteFeaturesRequest(feature_view="merchant", rows=rows))
            assert written.written == len(ENTITIES)
            response = await stub.BatchReadFeatures(
                pb.BatchReadFeaturesRequest(
                    reads=[
                        pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=ENTITIES),
                        pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]),
                    ]
                )
            )
            assert list(response.results[0].values) == [1.0, 2.0] * len(ENTITIES)
            assert set(response.results[1].statuses) == {pb.NOT_FOUND}

            lost = cluster.nodes[0]
            lost.kill()
            try:
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.ReadFeatures(pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=ENTITIES))
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Traceback" not in (failure.value.details() or "")
            finally:
                cluster.restart_shard(lost)
            response_after = await stub.ReadFeatures(
                pb.ReadFeaturesRequest(feature_view="merchant", entity_ids=ENTITIES)
            )
            assert len(response_after.statuses) == 2 * len(ENTITIES)  # answered again once the shard is back
    finally:
        process.stop()


async def test_demo_seeding_works_against_a_cluster(cluster: RedisClusterServers, tmp_path: Path) -> None:
    """`REDIS_URL=redis://<any node> make run` used to die here with a cross-slot error."""
    cluster.flushall()
    write_demo_views(tmp_path / "feature_views.json")
    written = await seed_demo_features(cluster.nodes[0].url, tmp_path / "feature_views.json")
    world = synthetic.make_world()
    assert written == {"user": len(world.users), "merchant": len(world.merchants)}
    keys = 0
    for url in cluster.urls:
        with redis.Redis.from_url(url) as client:
            keys += client.dbsize()
    assert keys == len(world.users) + len(world.merchants)
