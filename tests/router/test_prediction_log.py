"""The prediction log (router.prediction_log) writing to a real, private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from demo.redis_server import RedisServer
from infermesh import prediction_index
from infermesh.model_config import ModelConfig
from infermesh.tensors import Tensor
from router.prediction_log import LoggedRequest, PredictionLog, Record

KEY = b"test-hash-key-0123456789abcdef"


def model(rate: float, raw: bool = False) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
            "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
            "monitoring": {"log_sample_rate": rate, "log_raw_inputs": raw},
        }
    )


def requests(count: int) -> list[LoggedRequest]:
    return [
        LoggedRequest(
            f"req-{i}", (i, i + 1), {"flag": "x"}, {"user_id": [f"user-{i}"]}, None, {"user_id": [f"user-{i}"]}
        )
        for i in range(count)
    ]


def outputs(count: int) -> dict[str, Tensor]:
    data = np.arange(count, dtype=np.float32) / 10
    return {"p": Tensor("p", "FP32", data.shape, data)}


async def test_records_hold_hashed_ids_and_the_stream_stays_bounded(redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    log = PredictionLog(prediction_index.connect(redis_server.url), KEY, stream="preds", max_len=200, seed=1)
    config = model(1.0)
    count = 1000
    features = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
    for start in range(0, count, 100):  # batches of 100, all sampled
        chunk = requests(count)[start : start + 100]
        rebased = [LoggedRequest(r.request_id, (i, i + 1), r.flags, r.entity_ids) for i, r in enumerate(chunk)]
        log.record(config, "1", rebased, outputs(100), features[start : start + 100])
        await log.flush()
    node = int(admin.config_get("stream-node-max-entries")["stream-node-max-entries"])
    length = admin.xlen("preds")
    assert 200 <= length <= 200 + node  # MAXLEN ~: trimmed in whole nodes of the stream
    entries = admin.xrange("preds")
    last = {k.decode(): v.decode() for k, v in entries[-1][1].items()}
    assert last["id"] == "req-999" and last["model"] == "m" and last["version"] == "1"
    assert json.loads(last["features"]) == [[1998.0, 1999.0]]
    assert json.loads(last["outputs"]) == {"p": [pytest.approx(9.9)]}
    assert json.loads(last["flags"]) == {"flag": "x"}
    hashed = hmac.new(KEY, b"user-999", hashlib.sha256).digest()[:16].hex()
    assert json.loads(last["entities"]) == {"user_id": [hashed]}
    assert "inputs" not in last  # no raw inputs without the opt-in
    assert not any(b"user-" in value for _, fields in entries for value in fields.values())
    await log.close()
    admin.close()


async def test_raw_inputs_only_on_opt_in_and_sampling_follows_the_rate(redis_server: RedisServer) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    log = PredictionLog(prediction_index.connect(redis_server.url), KEY, stream="raw", seed=3)
    log.record(model(1.0, raw=True), "2", requests(1), outputs(1))
    await log.flush()
    (entry,) = admin.xrange("raw")
    assert json.loads(entry[1][b"inputs"]) == {"user_id": ["user-0"]}
    sampled = sum(len(log.sample(model(0.1), 100)) for _ in range(100))
    assert 800 <= sampled <= 1200  # 10 % of 10 000
    assert log.sample(model(0.0), 100) == []
    await log.close()
    admin.close()


async def test_the_writer_lingers_so_that_one_round_trip_carries_records_that_arrive_together(
    redis_server: RedisServer,
) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    log = PredictionLog(prediction_index.connect(redis_server.url), KEY, stream="linger", linger_s=0.2)
    round_trips: list[int] = []
    write = log._write

    async def counted(batch: list[Record]) -> None:
        round_trips.append(len(batch))
        await write(batch)

    log._write = counted  # type: ignore[method-assign]
    writer = asyncio.create_task(log.run())
    try:
        unflagged = [LoggedRequest(f"r-{i}", (i, i + 1), {}) for i in range(4)]
        log.record(model(1.0), "1", unflagged[:1], outputs(4))
        await asyncio.sleep(0.05)  # the writer has the first record and lingers
        assert round_trips == []
        log.record(model(1.0), "1", unflagged[1:], outputs(4))
        deadline = time.monotonic() + 5
        while admin.xlen("linger") < 4:
            assert time.monotonic() < deadline, "the writer did not write the records"
            await asyncio.sleep(0.02)
        assert round_trips == [4]  # one pipeline for the four
        assert {fields[b"flags"] for _, fields in admin.xrange("linger")} == {b"{}"}
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        await log.close()
        admin.close()


async def test_a_batch_is_one_script_call_and_a_redis_refusing_scripts_gets_the_same_records(
    redis_server: RedisServer,
) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.flushall()
    admin.config_resetstat()
    scripted = PredictionLog(prediction_index.connect(redis_server.url), KEY, stream="scripted", max_len=1000)
    scripted.record(model(1.0), "1", requests(20), outputs(20))
    await scripted.flush()
    # Calls that ran (a first one may fail NOSCRIPT: the client then loads the script and calls again).
    calls = {name: stat["calls"] - stat["failed_calls"] for name, stat in admin.info("commandstats").items()}
    assert calls["cmdstat_evalsha"] == 1  # the batch's 20 XADDs, HSETs and EXPIREs in one call
    assert calls["cmdstat_xadd"] == calls["cmdstat_hset"] == calls["cmdstat_expire"] == 20
    # A user whose ACL forbids scripts: the log notices once and writes the same records in pipelines.
    admin.acl_setuser(
        "no-scripts",
        enabled=True,
        passwords=["+no-scripts-password"],
        keys=["*"],
        categories=["+@all"],
        commands=["-evalsha", "-eval", "-script"],
    )
    try:
        port = admin.connection_pool.connection_kwargs["port"]
        url = f"redis://no-scripts:no-scripts-password@127.0.0.1:{port}/0"
        pipelined = PredictionLog(prediction_index.connect(url), KEY, stream="pipelined", max_len=1000)
        pipelined.record(model(1.0), "1", requests(20), outputs(20))
        await pipelined.flush()
        pipelined.record(model(1.0), "1", requests(20)[:5], outputs(5))
        await pipelined.flush()
        await pipelined.close()
    finally:
        admin.acl_deluser("no-scripts")

    def entries(stream: str) -> list[dict[bytes, bytes]]:
        return [{k: v for k, v in fields.items() if k != b"time_ms"} for _, fields in admin.xrange(stream)]

    assert len(entries("scripted")) == 20 and entries("pipelined")[:20] == entries("scripted")
    assert len(entries("pipelined")) == 25  # the fallback stays: later batches are written too
    for stream in ("scripted", "pipelined"):
        key = prediction_index.index_key(stream, "req-7")
        indexed = admin.hgetall(key)
        assert indexed[b"model"] == b"m" and indexed[b"version"] == b"1"
        assert 0 < admin.ttl(key) <= scripted.index_ttl_s
    await scripted.close()
    admin.close()


async def test_a_full_buffer_drops_and_counts_and_a_dead_redis_costs_records_not_requests(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    def dropped(reason: str) -> float:
        return REGISTRY.get_sample_value("infermesh_prediction_log_dropped_total", {"reason": reason}) or 0.0

    full_before, failed_before = dropped("buffer_full"), dropped("write_failed")
    # Nothing listens on this port: every write fails.
    log = PredictionLog(prediction_index.connect("redis://127.0.0.1:9/0", timeout_s=0.2), KEY, buffer=3)
    log.record(model(1.0), "1", requests(5), outputs(5))  # returns at once: 3 buffered, 2 dropped
    assert log.buffered == 3
    assert dropped("buffer_full") - full_before == 2
    await log.flush()  # Redis refuses: the records are counted as not written, nothing raises
    assert dropped("write_failed") - failed_before == 3 and log.buffered == 0
    await log.close()
