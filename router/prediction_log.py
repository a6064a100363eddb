"""The prediction log: a sampled record of what a model version answered, written to a Redis Stream off the request
path.

A model opts in with its config's `monitoring.log_sample_rate`. Per coalesced batch one vectorised draw picks the
sampled requests; only those get a record (request id, tenant, trace id, time, model, version, rows, score, joined
feature vector, outputs, flags, entity ids as keyed hashes; raw request inputs only under
`monitoring.log_raw_inputs`). Records go into a bounded buffer that a writer task drains to the stream, a batch per
call of a Lua script (XADDs with `MAXLEN ~ max_len`, lingering LINGER_S for more records first), so the stream never
grows past about max_len entries. Each record with a request id is indexed by it too (a small hash with a TTL,
infermesh.prediction_index), for label feedback to join labels to.
A full buffer drops the record and counts it: a request never waits for the log, and a Redis outage costs records,
not requests.

Entity ids are HMAC-SHA256 hashes under a key of the operator's (a file, never logged): the same id hashes the same
across the log and across restarts, so records can be joined per entity without the log holding the id.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from infermesh import metrics, prediction_index, telemetry
from infermesh.model_config import ModelConfig
from infermesh.tensors import Tensor

log = logging.getLogger(__name__)

Record = dict[FieldT, EncodableT]  # one stream entry's fields

HASHED_ID_BYTES = 16  # 128 bits of the HMAC: collisions stay out of reach for any log's size
NO_FLAGS = "{}"
# A writer round waits this long for more records before its round trip: under load one pipeline then carries tens
# of records instead of a few (each round trip is a socket write and a wake-up of Redis and of the writer), and
# records are off the request path, so reaching the stream 20 ms later costs no request anything.
LINGER_S = 0.02
RETRY_PAUSE_S = 1.0  # after a failed write: the next batch waits this long, the buffer absorbs (and drops) meanwhile

# A batch written by one script call: each record's XADD and, when indexed, its index hash and expiry. A pipeline
# of the same commands costs the router about three times the CPU (redis-py parses and dispatches each of the three
# replies per record in Python; the script answers once); Redis spends a little more (the script's own calls).
# KEYS: the stream, then the index key of each indexed record, in order. ARGV: max length, index TTL, then per
# record: its field count, its index field count (0: not indexed), its fields, its index fields (name, value pairs).
WRITE_SCRIPT = """
local stream, max_len, ttl = KEYS[1], ARGV[1], ARGV[2]
local at, key, last = 3, 2, #ARGV
while at <= last do
  local fields, indexed = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  at = at + 2
  redis.call('XADD', stream, 'MAXLEN', '~', max_len, '*', unpack(ARGV, at, at + 2 * fields - 1))
  at = at + 2 * fields
  if indexed > 0 then
    redis.call('HSET', KEYS[key], unpack(ARGV, at, at + 2 * indexed - 1))
    redis.call('EXPIRE', KEYS[key], ttl)
    key = key + 1
    at = at + 2 * indexed
  end
end
"""


@dataclass(slots=True)
class LoggedRequest:
    """What a sampled request contributes to its record, besides its rows of the batch."""

    request_id: str
    rows: tuple[int, int]  # its rows of the batch: [lo, hi)
    flags: Mapping[str, str]
    entity_ids: Mapping[str, Sequence[str]] = field(default_factory=dict)  # entity input → one id per row
    trace_context: Any = None
    raw_inputs: Mapping[str, Any] = field(default_factory=dict)  # input → rows, kept only under log_raw_inputs
    tenant: str = ""  # the tenant the gateway authenticated: label feedback is authorized against it


class PredictionLog:
    """Sampled prediction records, buffered (bounded) and written to one Redis Stream by `run()`."""

    def __init__(
        self,
        redis: aioredis.Redis,
        hash_key: bytes,
        stream: str = "infermesh:predictions",
        max_len: int = 100_000,
        buffer: int = 10_000,
        write_batch: int = 256,
        linger_s: float = LINGER_S,
        seed: int | None = None,
        index_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        if not hash_key:
            raise ValueError("the prediction log needs a key to hash entity ids with")
        self._redis = redis
        self._hash_key = hash_key
        self.stream = stream
        self.max_len = max_len
        self.index_ttl_s = index_ttl_s  # 0: no index by request id (no label feedback)
        self._queue: asyncio.Queue[Record] = asyncio.Queue(buffer)
        self._write_batch = write_batch
        self._linger_s = linger_s
        self._rng = np.random.default_rng(seed)
        self._full = metrics.PREDICTION_LOG_DROPPED.labels("buffer_full")
        self._unwritten = metrics.PREDICTION_LOG_DROPPED.labels("write_failed")
        self._written = metrics.PREDICTION_LOG_WRITTEN
        self._script = redis.register_script(WRITE_SCRIPT)
        self._scripted = True  # until Redis refuses scripts (an ACL without EVALSHA): pipelines then

    def hash_id(self, entity_id: str) -> str:
        # hmac.digest: OpenSSL's one-shot HMAC, without the two hash objects hmac.new() builds per call.
        return hmac.digest(self._hash_key, entity_id.encode(), "sha256")[:HASHED_ID_BYTES].hex()

    def sample(self, config: ModelConfig, requests: int) -> list[int]:
        """Which of a batch's `requests` to log (the model's sample rate): one vectorised draw per batch."""
        monitoring = config.monitoring
        if monitoring is None or monitoring.log_sample_rate <= 0 or requests == 0:
            return []
        return np.flatnonzero(self._rng.random(requests) < monitoring.log_sample_rate).tolist()

    def record(
        self,
        config: ModelConfig,
        version: str,
        sampled: Sequence[LoggedRequest],
        outputs: Mapping[str, Tensor],
        features: np.ndarray | None = None,
    ) -> None:
        """The sampled requests of a batch `version` served, into the buffer; never blocks (full: dropped)."""
        raw = config.monitoring is not None and config.monitoring.log_raw_inputs
        counter = metrics.PREDICTION_LOG_RECORDS.labels(config.name)
        now_ms = str(int(time.time() * 1000))
        score = outputs.get(config.score_output)
        scored = score is not None and score.data.dtype.kind in "fiub"
        recorded = 0
        for request in sampled:
            lo, hi = request.rows
            record: Record = {
                "id": request.request_id,
                "tenant": request.tenant,
                "trace_id": telemetry.trace_id_of(request.trace_context),
                "time_ms": now_ms,
                "model": config.name,
                "version": version,
                "rows": hi - lo,
                "outputs": json.dumps({name: _plain(t.data[lo:hi]) for name, t in outputs.items()}),
                "flags": json.dumps(dict(request.flags)) if request.flags else NO_FLAGS,
                "entities": json.dumps(
                    {name: [self.hash_id(i) for i in ids] for name, ids in request.entity_ids.items()}
                ),
            }
            if scored and hi > lo:
                assert score is not None
                record["score"] = repr(float(score.data[lo:hi].reshape(-1)[0]))  # the request's first value
            if features is not None:
                record["features"] = json.dumps(_plain(features[lo:hi]))
            if raw and request.raw_inputs:
                record["inputs"] = json.dumps({name: _plain(v) for name, v in request.raw_inputs.items()})
            try:
                self._queue.put_nowait(record)
            except asyncio.QueueFull:
                self._full.inc()
                continue
            recorded += 1
        counter.inc(recorded)

    @property
    def buffered(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        """Drain the buffer to the stream until cancelled (a batch per round trip)."""
        while True:
            batch = [await self._queue.get()]
            if self._linger_s > 0 and self._queue.qsize() + 1 < self._write_batch:
                await asyncio.sleep(self._linger_s)
            if not await self._send(self._fill(batch)):
                await asyncio.sleep(RETRY_PAUSE_S)

    async def flush(self) -> None:
        """Write what the buffer holds now (at shutdown; tests)."""
        while not self._queue.empty():
            await self._send(self._fill([]))

    def _fill(self, batch: list[Record]) -> list[Record]:
        while len(batch) < self._write_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _send(self, batch: list[Record]) -> bool:
        """Write a batch; False (counted as dropped) when Redis did not take it."""
        try:
            await self._write(batch)
        except (RedisError, OSError) as error:
            self._unwritten.inc(len(batch))
            log.warning("prediction log write failed", extra={"fields": {"error": type(error).__name__}})
            return False
        self._written.inc(len(batch))
        return True

    async def _write(self, batch: list[Record]) -> None:
        if self._scripted:
            keys, args = self._script_arguments(batch)
            try:
                await self._script(keys=keys, args=args)
                return
            except ResponseError as error:
                if not _refuses_scripts(error):
                    raise
                self._scripted = False
                log.warning("prediction log: Redis refuses scripts, writing in pipelines from now on")
        pipeline = self._redis.pipeline(transaction=False)
        for record in batch:
            pipeline.xadd(self.stream, record, maxlen=self.max_len, approximate=True)
            key = self._index_key(record)
            if key is not None:
                pipeline.hset(key, mapping=prediction_index.index_fields(record))
                pipeline.expire(key, self.index_ttl_s)
        await pipeline.execute()

    def _index_key(self, record: Record) -> str | None:
        request_id = str(record["id"])
        if self.index_ttl_s > 0 and prediction_index.indexable(request_id):
            return prediction_index.index_key(self.stream, request_id)
        return None

    def _script_arguments(self, batch: list[Record]) -> tuple[list[str], list[EncodableT]]:
        keys: list[str] = [self.stream]
        args: list[EncodableT] = [self.max_len, self.index_ttl_s]
        for record in batch:
            key = self._index_key(record)
            indexed = prediction_index.index_fields(record) if key is not None else {}
            args += (len(record), len(indexed))
            args.extend(chain.from_iterable(record.items()))
            args.extend(chain.from_iterable(indexed.items()))
            if key is not None:
                keys.append(key)
        return keys, args

    async def close(self) -> None:
        await self._redis.aclose()


def _refuses_scripts(error: ResponseError) -> bool:
    """Redis will not run scripts for this client at all (an ACL without EVALSHA, scripting renamed away), as
    opposed to a failure of the write itself."""
    return isinstance(error, NoPermissionError) or "unknown command" in str(error)


def _plain(value: Any) -> Any:
    """JSON-ready: arrays to lists, bytes to text."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_plain(v) for v in value.reshape(-1)]
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
