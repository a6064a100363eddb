"""FeatureStore against a real private redis-server: reads, upserts, round trips, errors, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from demo import synthetic
from demo.redis_server import RedisServer
from demo.seed import seed_demo_features, write_demo_views
from feature_service.codec import pack_vector
from feature_service.store import WRITE_CHUNK_ROWS, FeatureStore
from feature_service.views import FeatureView, load_views
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, InvalidInput, NotFound, Unavailable
from infermesh.features import FeatureQuery, FeatureStatus

P, N, S = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.STALE


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def counter(name: str, view: str) -> float:
    return REGISTRY.get_sample_value(f"infermesh_{name}_total", {"view": view}) or 0.0


async def test_read_present_missing_and_partial_rows(store: FeatureStore) -> None:
    t = now_ms() - 5_000
    result = await store.write("user", [("u1", {"a": 1.0, "b": 2.0, "c": 3.0}, t), ("u2", {"b": 5.0}, t)])
    assert (result.written, result.skipped_older) == (2, 0)
    lookups, misses = counter("feature_lookups", "user"), counter("feature_misses", "user")

    block = await store.read("user", ["u1", "u2", "nobody"])

    assert block.view == "user" and block.feature_names == ("a", "b", "c")
    np.testing.assert_array_equal(block.values, [[1, 2, 3], [1.5, 5, 0], [1.5, -2, 0]])
    np.testing.assert_array_equal(block.statuses, [[P, P, P], [N, P, N], [N, N, N]])
    ages = block.ages_ms
    assert ((ages[0] >= 5_000) & (ages[0] < 5_000 + 30_000)).all()  # generous upper bound: slow CI machines
    assert ages[1, 1] == ages[0, 0] and ages[1, 0] == -1 and ages[1, 2] == -1
    assert (ages[2] == -1).all()
    assert counter("feature_lookups", "user") - lookups == 3
    assert counter("feature_misses", "user") - misses == 1


async def test_a_read_or_write_past_its_deadline_is_refused_before_redis(store: FeatureStore) -> None:
    t = now_ms() - 5_000
    await store.write("user", [("u1", {"a": 1.0}, t)])
    lookups = counter("feature_lookups", "user")
    expired = Deadline(time.monotonic() - 0.001)
    with pytest.raises(DeadlineExceeded, match="before the feature read"):
        await store.read_many([FeatureQuery("user", ["u1"])], expired)
    with pytest.raises(DeadlineExceeded, match="before the feature write"):
        await store.write("user", [("u1", {"a": 9.0}, t + 1)], expired)
    assert counter("feature_lookups", "user") == lookups  # nothing was read
    block = await store.read_many([FeatureQuery("user", ["u1"])], Deadline.after(5))
    assert block[0].values[0, 0] == 1.0  # nor written


async def test_read_named_features_in_the_order_asked(store: FeatureStore) -> None:
    await store.write("user", [("u1", {"a": 1.0, "c": 3.0}, now_ms())])
    block = await store.read("user", ["u1", "u1"], ["c", "b", "a"])
    assert block.feature_names == ("c", "b", "a")
    np.testing.assert_array_equal(block.values, [[3, -2, 1], [3, -2, 1]])
    np.testing.assert_array_equal(block.statuses, [[P, N, P], [P, N, P]])


async def test_stale_values_are_still_returned(store: FeatureStore) -> None:
    max_age_ms = store.view("user").max_age_ms
    old = now_ms() - max_age_ms - 10_000
    await store.write("user", [("old", {"a": 4.0, "b": 5.0, "c": 6.0}, old), ("new", {"a": 7.0}, now_ms())])
    await store.write("merchant", [("m", {"x": 1.0, "y": 2.0}, 1)])  # 1970, but the view has no max age
    stale_before = counter("feature_stale", "user")

    user = await store.read("user", ["old", "new"])
    merchant = await store.read("merchant", ["m"])

    np.testing.assert_array_equal(user.values[0], [4, 5, 6])
    np.testing.assert_array_equal(user.statuses, [[S, S, S], [P, N, N]])
    assert (user.ages_ms[0] >= max_age_ms + 10_000).all()
    assert counter("feature_stale", "user") - stale_before == 1
    np.testing.assert_array_equal(merchant.statuses, [[P, P]])
    np.testing.assert_array_equal(merchant.values, [[1, 2]])


async def test_vectors_shorter_or_longer_than_the_view(store: FeatureStore, redis_admin: redis.Redis) -> None:
    t = now_ms()
    # As written before feature c was appended to the view, and after one was dropped from its end.
    redis_admin.set(store.key("user", "short"), pack_vector(t, np.array([1.0, 2.0], np.float32)))
    redis_admin.set(store.key("user", "long"), pack_vector(t, np.array([1.0, 2.0, 3.0, 4.0], np.float32)))
    block = await store.read("user", ["short", "long"])
    np.testing.assert_array_equal(block.values, [[1, 2, 0], [1, 2, 3]])
    np.testing.assert_array_equal(block.statuses, [[P, P, N], [P, P, P]])


async def test_older_event_never_overwrites_and_partial_rows_merge(
    store: FeatureStore, redis_admin: redis.Redis
) -> None:
    t = now_ms() - 10_000
    await store.write("user", [("u", {"a": 1.0, "b": 2.0, "c": 3.0}, t)])

    older = await store.write("user", [("u", {"a": 99.0, "b": 99.0, "c": 99.0}, t - 1)])
    assert (older.written, older.skipped_older) == (0, 1)
    assert redis_admin.get(store.key("user", "u")) == pack_vector(t, np.array([1, 2, 3], np.float32))

    newer = await store.write("user", [("u", {"b": 20.0}, t + 5_000)])  # partial: a and c keep their values
    assert (newer.written, newer.skipped_older) == (1, 0)
    assert redis_admin.get(store.key("user", "u")) == pack_vector(t + 5_000, np.array([1, 20, 3], np.float32))

    same_time = await store.write("user", [("u", {"c": 30.0}, t + 5_000)])  # a replay of the same event applies
    assert (same_time.written, same_time.skipped_older) == (1, 0)
    block = await store.read("user", ["u"])
    np.testing.assert_array_equal(block.values, [[1, 20, 30]])
    assert (block.ages_ms >= 5_000 - 1).all() and (block.ages_ms < 10_000).all()  # age of the newest event


async def test_partial_update_of_a_short_vector_fills_new_features(
    store: FeatureStore, redis_admin: redis.Redis
) -> None:
    t = now_ms()
    redis_admin.set(store.key("user", "u"), pack_vector(t, np.array([1.0], np.float32)))
    await store.write("user", [("u", {"c": 3.0}, t + 1)])
    block = await store.read("user", ["u"])
    np.testing.assert_array_equal(block.values, [[1, -2, 3]])
    np.testing.assert_array_equal(block.statuses, [[P, N, P]])


async def test_rows_of_one_batch_apply_in_order(store: FeatureStore) -> None:
    t = now_ms()
    result = await store.write("user", [("u", {"a": 1.0}, t), ("u", {"a": 2.0}, t - 1), ("u", {"b": 3.0}, t + 1)])
    assert (result.written, result.skipped_older) == (2, 1)
    block = await store.read("user", ["u"])
    np.testing.assert_array_equal(block.values, [[1, 3, 0]])


async def test_a_large_write_is_one_pipeline_of_chunked_script_calls(
    store: FeatureStore, command_calls: Callable[[str], int]
) -> None:
    rows = [(f"e{i}", {"x": float(i), "y": -float(i)}, i + 1) for i in range(2 * WRITE_CHUNK_ROWS + 7)]
    result = await store.write("merchant", rows)
    assert (result.written, result.skipped_older) == (len(rows), 0)
    assert command_calls("evalsha") == 3
    assert command_calls("set") == len(rows)  # from inside the script: no per-row client commands
    block = await store.read("merchant", ["e0", f"e{len(rows) - 1}"])
    np.testing.assert_array_equal(block.values, [[0, 0], [len(rows) - 1, -(len(rows) - 1)]])


async def test_read_many_is_one_mget_round_trip(store: FeatureStore, command_calls: Callable[[str], int]) -> None:
    t = now_ms()
    await store.write("user", [("u1", {"a": 1.0, "b": 2.0, "c": 3.0}, t)])
    await store.write("merchant", [("m1", {"x": 5.0, "y": 6.0}, t)])
    mgets_before, gets_before = command_calls("mget"), command_calls("get")

    blocks = await store.read_many(
        [
            FeatureQuery("user", ["u1", "u2"], ["b"]),
            ("merchant", ["m1"], None),
            FeatureQuery("user", ["u1"]),
        ]
    )

    assert command_calls("mget") - mgets_before == 1
    assert command_calls("get") == gets_before
    assert [block.view for block in blocks] == ["user", "merchant", "user"]
    np.testing.assert_array_equal(blocks[0].values, [[2], [-2]])
    np.testing.assert_array_equal(blocks[0].statuses, [[P], [N]])
    np.testing.assert_array_equal(blocks[1].values, [[5, 6]])
    np.testing.assert_array_equal(blocks[2].values, [[1, 2, 3]])


async def test_unknown_view_and_features(store: FeatureStore) -> None:
    with pytest.raises(NotFound, match=r"^feature view 'nope' not found$"):
        await store.read("nope", ["u1"])
    with pytest.raises(InvalidInput, match=r"feature view 'user' has no features \['zz', 'zzz'\]"):
        await store.read("user", ["u1"], ["a", "zzz", "zz"])
    with pytest.raises(NotFound, match="feature view 'nope' not found"):
        await store.write("nope", [("u1", {"a": 1.0}, now_ms())])
    with pytest.raises(InvalidInput, match=r"feature view 'user' has no features \['q'\]"):
        await store.write("user", [("u1", {"a": 1.0, "q": 2.0}, now_ms())])
    with pytest.raises(NotFound):  # a bad query anywhere in a batch fails it before any Redis call
        await store.read_many([("user", ["u1"], None), ("nope", ["u1"], None)])


async def test_entity_id_validation(store: FeatureStore, redis_server: RedisServer, views: dict) -> None:
    with pytest.raises(InvalidInput, match="entity_ids is empty"):
        await store.read("user", [])
    with pytest.raises(InvalidInput, match="entity id at index 1 is empty"):
        await store.read("user", ["u1", "", "u3"])
    with pytest.raises(InvalidInput, match="row 1 has an empty entity id"):
        await store.write("user", [("u1", {"a": 1.0}, now_ms()), ("", {"a": 1.0}, now_ms())])
    with pytest.raises(InvalidInput, match="no reads given"):
        await store.read_many([])
    with pytest.raises(InvalidInput, match="no rows"):
        await store.write("user", [])

    small = FeatureStore.connect(redis_server.url, views, max_entities_per_read=3)
    try:
        with pytest.raises(InvalidInput, match=r"too many entity ids: 4 in one call \(at most 3\)"):
            await small.read("user", ["a", "b", "c", "d"])
        with pytest.raises(InvalidInput, match=r"too many entity ids: 4 in one call \(at most 3\)"):
            await small.read_many([("user", ["a", "b"], None), ("merchant", ["c", "d"], None)])
        with pytest.raises(InvalidInput, match=r"too many rows: 4 in one call \(at most 3\)"):
            await small.write("user", [(str(i), {"a": 1.0}, 1) for i in range(4)])
        assert len((await small.read("user", ["a", "b", "c"])).values) == 3
    finally:
        await small.aclose()


async def test_script_cache_flush_is_recovered(store: FeatureStore, redis_admin: redis.Redis) -> None:
    redis_admin.script_flush()
    result = await store.write("user", [("u", {"a": 1.0}, now_ms())])
    assert result.written == 1
    assert (await store.read("user", ["u"])).values[0, 0] == 1.0


async def test_ping(store: FeatureStore) -> None:
    await store.ping()


@pytest.fixture
async def doomed_redis(
    tmp_path: Path, views: dict[str, FeatureView]
) -> AsyncIterator[tuple[RedisServer, FeatureStore]]:
    server = RedisServer(tmp_path / "doomed")
    server.start()
    feature_store = FeatureStore.connect(server.url, views, timeout_s=0.5)
    yield server, feature_store
    await feature_store.aclose()
    server.stop()


async def test_redis_down_is_unavailable_quickly(doomed_redis: tuple[RedisServer, FeatureStore]) -> None:
    server, store = doomed_redis
    await store.load_scripts()
    await store.write("user", [("u", {"a": 1.0}, now_ms())])
    assert (await store.read("user", ["u"])).values[0, 0] == 1.0  # a pooled connection now exists

    server.kill()

    for call in (
        store.read("user", ["u"]),
        store.write("user", [("u", {"a": 2.0}, now_ms())]),
        store.ping(),
    ):
        started = time.perf_counter()
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(call, timeout=5)  # a hang fails the test instead of blocking it
        assert time.perf_counter() - started < 1.5
        assert str(caught.value) == "feature store unavailable"  # no address, no key


async def test_redis_restart_is_healed_without_failing_a_call(doomed_redis: tuple[RedisServer, FeatureStore]) -> None:
    server, store = doomed_redis
    await store.load_scripts()
    await store.write("user", [("u", {"a": 1.0}, now_ms())])
    await store.read("user", ["u"])  # leaves an open connection in the pool

    server.restart_same_port()  # no persistence: data and scripts are gone, the pooled connection is dead

    assert (await store.read("user", ["u"])).statuses.tolist() == [[N, N, N]]
    assert (await store.write("user", [("u", {"a": 2.0}, now_ms())])).written == 1  # script loaded again
    assert (await store.read("user", ["u"])).values[0, 0] == 2.0


async def test_unresponsive_redis_times_out_as_unavailable(views: dict[str, FeatureView]) -> None:
    """A server that accepts connections and never answers: the socket timeout bounds the call."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = FeatureStore.connect(f"redis://127.0.0.1:{port}/0", views, timeout_s=0.2)
    try:
        started = time.perf_counter()
        with pytest.raises(Unavailable, match=r"^feature store unavailable$"):
            await asyncio.wait_for(store.read("user", ["u"]), timeout=5)
        elapsed = time.perf_counter() - started
        assert 0.2 <= elapsed < 1.5  # one timeout, one immediate retry, then give up
        assert accepted
    finally:
        await store.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_seed_demo_features_writes_the_synthetic_world(
    redis_server: RedisServer, redis_admin: redis.Redis, tmp_path: Path
) -> None:
    views_path = tmp_path / "views.json"
    write_demo_views(views_path)
    t = now_ms()
    written = await seed_demo_features(redis_server.url, views_path, now_ms=t)
    assert written == {"user": synthetic.N_USERS, "merchant": synthetic.N_MERCHANTS}
    assert redis_admin.dbsize() == synthetic.N_USERS + synthetic.N_MERCHANTS

    world = synthetic.make_world()
    store = FeatureStore.connect(redis_server.url, load_views(views_path))
    try:
        users, merchants = await store.read_many(
            [("user", ["u0", "u9999", "u10000"], None), ("merchant", ["m0", "m999"], None)]
        )
    finally:
        await store.aclose()
    np.testing.assert_array_equal(users.values[:2], world.users[[0, 9999]])
    assert (users.statuses[:2] == P).all() and (users.statuses[2] == N).all()
    np.testing.assert_array_equal(merchants.values, world.merchants[[0, 999]])
    assert (merchants.statuses == P).all()


async def test_more_concurrent_reads_than_connections_wait_instead_of_failing(
    redis_server: RedisServer, views: dict
) -> None:
    small_pool = FeatureStore.connect(redis_server.url, views, max_connections=4)
    try:
        blocks = await asyncio.gather(*(small_pool.read("user", [f"u{i}"]) for i in range(150)))
    finally:
        await small_pool.aclose()
    assert len(blocks) == 150  # none raised Unavailable (MaxConnectionsError before the blocking pool)
