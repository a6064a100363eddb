"""The feature store on Redis: reads of many views' vectors in one MGET, last-write-wins upserts by Lua script.

One key per (view, entity), `{prefix}:fv:{view}:{entity_id}`, holding a vector in the layout of
`feature_service.codec`. Redis outages surface as Unavailable; nothing here knows of gRPC.

Three deployments, told apart by `open_redis` from the URL alone: one primary (`redis://`, `rediss://`), a
primary that Sentinel fails over (`redis+sentinel://`), and a Redis Cluster (any node's `redis://` URL; the
node says it is in cluster mode). On a cluster the keys of one read live on many shards, and MGET and multi-key
scripts must stay within one hash slot: a read is one pipeline of GETs per shard, the shards asked in parallel,
and a write one upsert script call per row (a row is one key, so each row stays atomic).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, cast
from urllib.parse import unquote, urlsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from feature_service.codec import _shorten, build_block, encode_row, unpack_vectors
from feature_service.views import FeatureView
from infermesh import metrics, telemetry
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, InvalidInput, NotFound, Unavailable
from infermesh.features import FeatureBlock, FeatureQuery
from infermesh.redis_packing import pack_with_hiredis, packed_by_hiredis

log = logging.getLogger(__name__)

WRITE_CHUNK_ROWS = 500  # rows per script call, so one call never blocks Redis for long
_COLUMN_CACHE_SIZE = 1024
# Server replies that mean "try again later" rather than a bug on our side.
_PIPELINE_ERROR = "of pipeline caused error: "
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "OOM", "TRYAGAIN", "CLUSTERDOWN")

# Upsert of a batch of rows; last write wins by event time, partial rows merge into the stored vector.
# ARGV[1]: the keys' time to live in milliseconds ("0": none), set with the value (SET ... PX) so that no key
# ever exists without it. KEYS[i]: key of row i. ARGV[2i]: packed vector of row i (NaN where the row gives no
# value). ARGV[2i+1]: "1" when row i is partial, i.e. has NaN slots to fill from the stored vector.
# A row skipped as older leaves the stored key and its TTL alone.
UPSERT_SCRIPT = """
local nan = "\\0\\0\\192\\127"
local ttl_ms = tonumber(ARGV[1])
local written, skipped = 0, 0
for i, key in ipairs(KEYS) do
  local new = ARGV[2 * i]
  local stored = redis.call("GET", key)
  if stored and #stored >= 8 and struct.unpack("<i8", stored) > struct.unpack("<i8", new) then
    skipped = skipped + 1
  else
    if stored and ARGV[2 * i + 1] == "1" then
      local parts = {string.sub(new, 1, 8)}
      for at = 9, #new, 4 do
        local value = string.sub(new, at, at + 3)
        if value == nan then
          local old = string.sub(stored, at, at + 3)
          if #old == 4 then value = old end
        end
        parts[#parts + 1] = value
      end
      new = table.concat(parts)
    end
    if ttl_ms > 0 then
      redis.call("SET", key, new, "PX", ttl_ms)
    else
      redis.call("SET", key, new)
    end
    written = written + 1
  end
end
return {written, skipped}
"""
UPSERT_SHA = hashlib.sha1(UPSERT_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """What a write may carry and how long it stays (the feature service's settings of the same names)."""

    max_future_skew_s: float = 300.0  # an event time further ahead of our clock is refused
    ttl_max_age_multiple: float = 10.0  # keys live this many times their view's max_age (0: no TTL)
    ttl_default_s: float = 0.0  # keys of a view with max_age 0 (never stale) live this long (0: no TTL)

    def ttl_ms(self, max_age_ms: int) -> int:
        """A view's key time to live in milliseconds (0: none): by then a value has long been served as STALE."""
        if max_age_ms > 0:
            return max(round(max_age_ms * self.ttl_max_age_multiple), 0)
        return max(round(self.ttl_default_s * 1000), 0)


@dataclass(frozen=True, slots=True)
class WriteResult:
    written: int
    skipped_older: int  # rows ignored because a newer event was already stored


def create_redis(url: str, timeout_s: float, max_connections: int = 64) -> aioredis.Redis:
    """A client tuned for the hot path: bounded timeouts, a bounded pool and a single immediate retry.

    Without a retry, the first call on a pooled connection that died with a Redis restart fails; one
    immediate retry reconnects. No backoff and no more tries, so a real outage fails fast (a refused
    connection at once, an unresponsive server after about twice `timeout_s`). The pool blocks (up to
    `timeout_s`) when every connection is busy instead of failing with MaxConnectionsError, which
    made bursts of concurrent reads answer UNAVAILABLE while Redis was healthy.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
    )
    return aioredis.Redis.from_pool(pack_with_hiredis(pool))  # from_pool: closing the client closes the pool too


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
FeatureRedis = aioredis.Redis | RedisCluster


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """`redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]` → (sentinels, service, db,
    password). The password, if any, is the primary's; the sentinels are asked without one."""
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1]) if ":" in credentials else unquote(credentials)
    sentinels = []
    for address in netloc.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel URL: '{address}' is not host:port")
        sentinels.append((host, int(port)))
    path = [part for part in parts.path.split("/") if part]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("sentinel URL: the path must be /service_name or /service_name/db")
    return sentinels, path[0], int(path[1]) if len(path) == 2 else 0, password


async def open_redis(url: str, timeout_s: float, max_connections: int = 64) -> FeatureRedis:
    """The client for `url`, whatever stands behind it: one primary, a Sentinel-managed primary, or a Redis
    Cluster (asked once: a node in cluster mode says `cluster_enabled:1`). Raises Unavailable when the node the
    URL names cannot be reached to tell."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        return create_sentinel_redis(url, timeout_s, max_connections)
    client = create_redis(url, timeout_s, max_connections)
    try:
        info = await client.info("cluster")
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        await client.aclose()
        raise Unavailable("feature store unavailable") from error
    except ResponseError:
        info = {}  # a server without the section (or one that refuses INFO) is not a cluster node
    if not int(info.get("cluster_enabled", 0)):
        return client
    await client.aclose()
    cluster = RedisCluster.from_url(
        url,
        max_connections=max_connections,  # per node
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),  # one re-discovery of the slots after a failed call, then fail fast
        decode_responses=False,
    )
    try:
        await cluster.initialize()
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        await cluster.aclose()
        raise Unavailable("feature store unavailable") from error
    return cluster


def create_sentinel_redis(url: str, timeout_s: float, max_connections: int = 64) -> aioredis.Redis:
    """A client of the primary that Sentinel names now; after a failover the next connection goes to the new
    one (the pool asks the sentinels again when a connection fails)."""
    sentinels, service, db, password = parse_sentinel_url(url)
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    sentinel = Sentinel(sentinels, sentinel_kwargs=options, **options)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    tls = urlsplit(url).scheme.startswith("rediss")
    return cast(
        "aioredis.Redis",
        sentinel.master_for(
            service,
            db=db,
            password=password,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1),
            connection_class=packed_by_hiredis(SentinelManagedSSLConnection if tls else SentinelManagedConnection),
            decode_responses=False,
        ),
    )


class _Columns(NamedTuple):
    names: tuple[str, ...]
    positions: np.ndarray | None  # None: the whole stored vector in order


class FeatureStore:
    """Reads and writes feature vectors of the registered views. Knows nothing of gRPC."""

    def __init__(
        self,
        redis: FeatureRedis,
        views: Mapping[str, FeatureView],
        *,
        key_prefix: str = "im",
        max_entities_per_read: int = 10_000,
        write_policy: WritePolicy = WritePolicy(),
    ) -> None:
        self._redis = redis
        self._cluster = redis if isinstance(redis, RedisCluster) else None
        self._views = dict(views)
        self._max_entities = max_entities_per_read
        self._key_prefixes = {name: f"{key_prefix}:fv:{name}:" for name in self._views}
        self._max_future_skew_ms = round(write_policy.max_future_skew_s * 1000)
        self._ttl_ms = {name: write_policy.ttl_ms(view.max_age_ms) for name, view in self._views.items()}
        # Metric children resolved once; `.labels()` per request costs a lock and a dict lookup.
        self._counters = {
            name: (
                metrics.FEATURE_LOOKUPS.labels(name),
                metrics.FEATURE_MISSES.labels(name),
                metrics.FEATURE_STALE.labels(name),
            )
            for name in self._views
        }
        self._columns: dict[tuple[str, tuple[str, ...]], _Columns] = {}
        for view in self._views.values():
            metrics.FEATURE_VIEW_MAX_AGE.labels(view.name).set(view.max_age_ms / 1000)

    @classmethod
    def connect(
        cls,
        redis_url: str,
        views: Mapping[str, FeatureView],
        *,
        timeout_s: float = 1.0,
        key_prefix: str = "im",
        max_entities_per_read: int = 10_000,
        max_connections: int = 64,
        write_policy: WritePolicy = WritePolicy(),
    ) -> FeatureStore:
        """A store with its own client (no I/O yet: connections open on first use)."""
        return cls(
            create_redis(redis_url, timeout_s, max_connections),
            views,
            key_prefix=key_prefix,
            max_entities_per_read=max_entities_per_read,
            write_policy=write_policy,
        )

    @classmethod
    async def open(
        cls,
        redis_url: str,
        views: Mapping[str, FeatureView],
        *,
        timeout_s: float = 1.0,
        key_prefix: str = "im",
        max_entities_per_read: int = 10_000,
        max_connections: int = 64,
        write_policy: WritePolicy = WritePolicy(),
    ) -> FeatureStore:
        """A store on whatever `redis_url` names (one primary, Sentinel or a cluster: see `open_redis`)."""
        return cls(
            await open_redis(redis_url, timeout_s, max_connections),
            views,
            key_prefix=key_prefix,
            max_entities_per_read=max_entities_per_read,
            write_policy=write_policy,
        )

    @property
    def clustered(self) -> bool:
        return self._cluster is not None

    @property
    def views(self) -> Mapping[str, FeatureView]:
        return self._views

    def list_views(self) -> list[FeatureView]:
        return list(self._views.values())

    def view(self, name: str) -> FeatureView:
        view = self._views.get(name)
        if view is None:
            raise NotFound(f"feature view '{name}' not found")
        return view

    def ttl_ms(self, view: str) -> int:
        """The time to live a write gives the view's keys, in milliseconds (0: none)."""
        return self._ttl_ms[self.view(view).name]

    def key(self, view: str, entity_id: str) -> str:
        return self._key_prefixes[self.view(view).name] + entity_id

    async def ping(self) -> None:
        """Readiness: raises Unavailable unless Redis answers."""
        with self._redis_errors("ping"):
            await self._redis.ping()

    async def load_scripts(self) -> None:
        with self._redis_errors("script_load"):
            sha = await self._redis.script_load(UPSERT_SCRIPT)
        if sha != UPSERT_SHA:  # would mean Redis hashed a different text: EVALSHA could never succeed
            raise RuntimeError("Redis returned an unexpected SHA for the upsert script")

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def read(
        self, view: str, entity_ids: Sequence[str], feature_names: Sequence[str] | None = None
    ) -> FeatureBlock:
        return (await self.read_many([FeatureQuery(view, entity_ids, feature_names)]))[0]

    async def read_many(
        self,
        queries: Sequence[FeatureQuery | tuple[str, Sequence[str], Sequence[str] | None]],
        deadline: Deadline | None = None,
    ) -> list[FeatureBlock]:
        """Serve every query from one MGET round trip; blocks come back in query order. A read whose deadline
        has passed (it waited in gRPC's backlog) is refused before Redis is asked."""
        if not queries:
            raise InvalidInput("no reads given")
        plans: list[tuple[FeatureView, _Columns, int]] = []
        keys: list[str] = []
        for view_name, entity_ids, feature_names in queries:
            view = self.view(view_name)
            columns = self._resolve_columns(view, feature_names)
            count = self._check_entity_ids(view, entity_ids)
            if len(keys) + count > self._max_entities:
                raise InvalidInput(
                    f"too many entity ids: {len(keys) + count} in one call (at most {self._max_entities})"
                )
            prefix = self._key_prefixes[view.name]
            keys.extend([prefix + entity_id for entity_id in entity_ids])
            plans.append((view, columns, count))
        _check_deadline(deadline, "read")

        attributes: dict[str, telemetry.AttributeValue] = {
            "db.system": "redis",
            "db.operation": "MGET",
            "keys": len(keys),
        }
        with self._redis_errors("mget"), telemetry.span("redis.mget", **attributes):
            # decode_responses=False (create_redis): values come back as bytes, never str.
            if self._cluster is None:
                blobs = cast("list[bytes | None]", await self._redis.mget(keys))
            else:
                blobs = await self._cluster_get(self._cluster, keys)
        now_ms = time.time_ns() // 1_000_000

        blocks: list[FeatureBlock] = []
        start = 0
        for view, columns, count in plans:
            view_blobs = blobs[start : start + count]
            start += count
            event_times, stored = unpack_vectors(view_blobs, view.width)
            found_times = event_times[event_times > 0]
            if found_times.size:
                ages_s = np.maximum(now_ms - found_times, 0) / 1000  # a writer's clock ahead of ours: age 0
                metrics.FEATURE_AGE.observe_many(view.name, ages_s)
            block, stale_rows = build_block(view, columns.names, columns.positions, event_times, stored, now_ms)
            lookups, misses, stale = self._counters[view.name]
            lookups.inc(count)
            missed = view_blobs.count(None)
            if missed:
                misses.inc(missed)
            if stale_rows:
                stale.inc(stale_rows)
            blocks.append(block)
        return blocks

    @staticmethod
    async def _cluster_get(cluster: RedisCluster, keys: list[str]) -> list[bytes | None]:
        """One pipeline of GETs per shard, the shards in parallel (the cluster pipeline groups commands by the
        node serving their slot); MGET would need every key in one slot."""
        async with cluster.pipeline() as pipeline:
            for key in keys:
                pipeline.get(key)
            return cast("list[bytes | None]", await pipeline.execute())

    async def write(
        self, view: str, rows: Iterable[tuple[str, Mapping[str, float], int]], deadline: Deadline | None = None
    ) -> WriteResult:
        """Upsert rows `(entity_id, {feature: value}, event_time_ms)`: one pipelined round trip per call. Every row
        is checked before any is sent, so a refused call changes nothing stored."""
        _check_deadline(deadline, "write")
        feature_view = self.view(view)
        rows = list(rows)
        if not rows:
            raise InvalidInput(f"write to view '{view}': no rows")
        if len(rows) > self._max_entities:
            raise InvalidInput(f"too many rows: {len(rows)} in one call (at most {self._max_entities})")
        prefix = self._key_prefixes[feature_view.name]
        latest = time.time_ns() // 1_000_000 + self._max_future_skew_ms
        keys: list[str] = []
        arguments: list[bytes] = []
        for position, (entity_id, values, event_time_ms) in enumerate(rows):
            if not isinstance(entity_id, str) or not entity_id:
                raise InvalidInput(f"write to view '{view}': row {position} has an empty entity id")
            packed, partial = encode_row(
                feature_view, position, values, event_time_ms, entity_id=entity_id, latest_event_time_ms=latest
            )
            keys.append(prefix + entity_id)
            arguments.append(packed)
            arguments.append(b"1" if partial else b"0")
        ttl = str(self._ttl_ms[feature_view.name]).encode()

        try:
            results = await self._run_upserts(keys, arguments, ttl)
        except NoScriptError:
            # Redis restarted or its script cache was flushed since warm-up: load again, retry once.
            # Safe to repeat: all calls of the pipeline failed alike, and equal event times re-apply.
            await self.load_scripts()
            results = await self._run_upserts(keys, arguments, ttl)
        written = sum(int(result[0]) for result in results)
        skipped = sum(int(result[1]) for result in results)
        return WriteResult(written=written, skipped_older=skipped)

    async def _run_upserts(self, keys: list[str], arguments: list[bytes], ttl: bytes) -> list[list[int]]:
        attributes: dict[str, telemetry.AttributeValue] = {
            "db.system": "redis",
            "db.operation": "EVALSHA",
            "keys": len(keys),
        }
        with self._redis_errors("upsert"), telemetry.span("redis.upsert", **attributes):
            if self._cluster is not None:
                # One script call per row: its one key keeps it within a slot, and the row atomic.
                async with self._cluster.pipeline() as cluster_pipeline:
                    for position, key in enumerate(keys):
                        # execute_command: the cluster pipeline blocks its evalsha() helper (scripts of many keys
                        # could cross slots); ours has one key, routed by it like any keyed command.
                        cluster_pipeline.execute_command(
                            "EVALSHA", UPSERT_SHA, 1, key, ttl, *arguments[2 * position : 2 * position + 2]
                        )
                    return cast("list[list[int]]", await cluster_pipeline.execute())
            async with self._redis.pipeline(transaction=False) as pipeline:
                for start in range(0, len(keys), WRITE_CHUNK_ROWS):
                    chunk_keys = keys[start : start + WRITE_CHUNK_ROWS]
                    chunk_arguments = arguments[2 * start : 2 * (start + WRITE_CHUNK_ROWS)]
                    pipeline.evalsha(UPSERT_SHA, len(chunk_keys), *chunk_keys, ttl, *chunk_arguments)
                return await pipeline.execute()

    def _resolve_columns(self, view: FeatureView, feature_names: Sequence[str] | None) -> _Columns:
        if not feature_names:
            return _Columns(view.feature_names, None)
        names = tuple(feature_names)
        cache_key = (view.name, names)
        columns = self._columns.get(cache_key)
        if columns is not None:
            return columns
        index = view.index
        unknown = sorted({name for name in names if name not in index})
        if unknown:
            raise InvalidInput(f"feature view '{view.name}' has no features {_shorten(unknown)}")
        positions = None if names == view.feature_names else np.array([index[name] for name in names], dtype=np.intp)
        columns = _Columns(names, positions)
        if len(self._columns) >= _COLUMN_CACHE_SIZE:
            self._columns.clear()  # callers ask for a handful of layouts; a flood of new ones only resets it
        self._columns[cache_key] = columns
        return columns

    def _check_entity_ids(self, view: FeatureView, entity_ids: Sequence[str]) -> int:
        count = len(entity_ids)
        if count == 0:
            raise InvalidInput(f"read of view '{view.name}': entity_ids is empty")
        if count > self._max_entities:
            raise InvalidInput(f"too many entity ids: {count} in one call (at most {self._max_entities})")
        if "" in entity_ids:
            position = list(entity_ids).index("")
            raise InvalidInput(f"read of view '{view.name}': entity id at index {position} is empty")
        return count

    @contextmanager
    def _redis_errors(self, operation: str) -> Iterator[None]:
        """Redis outages become Unavailable with a client-safe message; the log says which call failed."""
        try:
            yield
        except NoScriptError:
            raise
        except (
            RedisConnectionError,
            RedisTimeoutError,
            ClusterError,  # CLUSTERDOWN, a shard's primary down
            RedisClusterException,  # a slot no reachable shard serves
            OSError,
            TimeoutError,
        ) as error:
            log.warning("feature store unreachable", extra={"fields": {"op": operation, "error": type(error).__name__}})
            raise Unavailable("feature store unavailable") from error
        except ResponseError as error:
            # A cluster pipeline prefixes the reply with the failed command (and its key: client data, not logged).
            reply = str(error).rpartition(_PIPELINE_ERROR)[2].lstrip("('\"")
            if reply.startswith(_TRANSIENT_REPLIES):
                log.warning("feature store busy", extra={"fields": {"op": operation, "error": reply[:80]}})
                raise Unavailable("feature store unavailable") from error
            raise


def _check_deadline(deadline: Deadline | None, operation: str) -> None:
    if deadline is not None and deadline.expired:
        raise DeadlineExceeded(f"deadline exceeded before the feature {operation}")
