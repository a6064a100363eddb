"""The prediction log's index by request id: what label feedback joins a label to.

With each sampled record the router's prediction log (router.prediction_log) writes, in the same pipeline as the
stream entry, a small hash `<stream>:request:<request id>` with a TTL: who asked (the tenant the gateway
authenticated), which model version answered, when, and the score the label will be judged against. The gateway's
feedback (gateway.feedback) reads it to authorize and join a label, and marks it labelled (HSETNX: a label counts
once). Entries expire after the TTL, so the index holds at most TTL x the log's write rate entries; ids longer than
MAX_ID_CHARS, and empty ones, are not indexed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from infermesh.redis_packing import pack_with_hiredis

MAX_ID_CHARS = 256
# The stream entry's fields copied into the index (the rest, features and outputs, stay in the stream only).
INDEXED_FIELDS = ("tenant", "model", "version", "time_ms", "score", "rows")
LABEL_FIELD = "label"


def index_key(stream: str, request_id: str) -> str:
    return f"{stream}:request:{request_id}"


def indexable(request_id: str) -> bool:
    return 0 < len(request_id) <= MAX_ID_CHARS


def index_fields(record: Mapping[FieldT, EncodableT]) -> dict[FieldT, EncodableT]:
    return {name: record[name] for name in INDEXED_FIELDS if name in record}


@dataclass(frozen=True, slots=True)
class IndexedPrediction:
    """A logged prediction as the index has it."""

    tenant: str
    model: str
    version: str
    time_ms: int
    score: float | None  # None: the score output was not numeric or absent
    rows: int
    labelled: bool


def _parse(fields: Mapping[bytes, bytes]) -> IndexedPrediction | None:
    if not fields:
        return None
    text = {key.decode(): value.decode() for key, value in fields.items()}
    try:
        score = float(text["score"]) if "score" in text else None
        return IndexedPrediction(
            text.get("tenant", ""),
            text["model"],
            text["version"],
            int(text["time_ms"]),
            score,
            int(text.get("rows", "1")),
            LABEL_FIELD in text,
        )
    except (KeyError, ValueError):  # written by something else: treated as unknown
        return None


async def lookup(redis: aioredis.Redis, stream: str, request_ids: Sequence[str]) -> list[IndexedPrediction | None]:
    """Each id's logged prediction (None: not indexed, expired or never logged): one pipelined round trip."""
    pipeline = redis.pipeline(transaction=False)
    for request_id in request_ids:
        pipeline.hgetall(index_key(stream, request_id))
    replies = await pipeline.execute()
    return [_parse(reply) for reply in replies]


# HSETNX on an entry that still exists: an entry expiring between the lookup and the mark is not brought back
# without its TTL. 1: marked; 0: labelled before; -1: gone.
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""
MARKED, LABELLED_BEFORE, GONE = 1, 0, -1


async def mark_labelled(redis: aioredis.Redis, stream: str, labels: Sequence[tuple[str, float]]) -> list[int]:
    """Record each (request id, label) on its index entry: MARKED, LABELLED_BEFORE (it counts once) or GONE."""
    pipeline = redis.pipeline(transaction=False)
    for request_id, label in labels:
        pipeline.eval(_MARK, 1, index_key(stream, request_id), LABEL_FIELD, repr(label))
    return [int(reply) for reply in await pipeline.execute()]


def connect(url: str, password: str | None = None, timeout_s: float = 1.0) -> aioredis.Redis:
    """A client of the prediction log's Redis: bounded timeouts and pool (the router's writer task, the gateway's
    feedback); `password` unless the URL carries one."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        password=password,
        max_connections=2,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pack_with_hiredis(pool))
