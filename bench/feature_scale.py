"""Feature store scale figures for BENCHMARKS.md: feature reads/s through one feature service on one Redis and on
a three-master Redis Cluster, and `infermesh features ingest` rows/s into each.

    .venv/bin/python -m bench.feature_scale [--duration 5] [--concurrency 64] [--entities 10,100] [--rows 50000]

Every Redis is private (started here on free ports). The figures are of this machine: the services, Redis and
the load generator share its cores, so a cluster's shards do not get cores of their own here as they would on
their own hosts; the read path's cost per call is what this compares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import environment as env
from bench.loadgen import closed_loop, result
from bench.workloads import FeatureRead
from demo.redis_server import RedisClusterServers, RedisServer
from feature_service.writers import write_token_file

VIEW = "bench10"


def _parquet(path: Path, rows: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = env.wide_feature_names(VIEW)
    rng = np.random.default_rng(3)
    now_ms = time.time_ns() // 1_000_000
    columns: dict[str, Any] = {"entity_id": [f"i{k}" for k in range(rows)], "event_time_ms": [now_ms] * rows}
    for name in names:
        columns[name] = rng.random(rows, dtype=np.float32)
    pq.write_table(pa.table(columns), path)
    return path


async def measure(redis_url: str, folder: Path, options: argparse.Namespace) -> dict[str, Any]:
    from infermesh import feature_cli
    from infermesh.proto import feature_store_pb2 as fpb
    from infermesh.proto import feature_store_pb2_grpc as fpb_grpc

    views_path = env.write_wide_views(folder / "feature_views.json")
    await env.seed_wide_views(redis_url, views_path, population=options.population)
    token = "imw_" + secrets.token_urlsafe(32)
    digests = folder / "feature_write_token.sha256"
    write_token_file(digests, token)
    settings = {"redis_url": redis_url, "views_path": views_path, "write_token_sha256_file": digests}
    service = env.start_service("feature_service", "feature_service_scale", folder, settings)
    out: dict[str, Any] = {"reads": []}
    try:
        await env.wait_ready(service)
        async with grpc.aio.insecure_channel(service.address) as channel:
            for entities in options.entities:
                send = FeatureRead(
                    channel,
                    VIEW,
                    env.wide_feature_names(VIEW),
                    entities,
                    population=options.population,
                    id_prefix="e",
                )
                recording = await closed_loop(send, options.concurrency, options.duration, 1.0)
                summary = result(recording)
                out["reads"].append(
                    {
                        "entities": entities,
                        "concurrency": options.concurrency,
                        "reads_per_s": summary["throughput_rps"],
                        "entity_rows_per_s": round(summary["throughput_rps"] * entities),
                        "p99_ms": summary["latency_ms"]["p99"],
                        "errors": summary["errors"],
                    }
                )
        parquet = _parquet(folder / "ingest.parquet", options.rows)
        with grpc.insecure_channel(service.address) as sync_channel:
            stub = fpb_grpc.FeatureStoreStub(sync_channel)
            views = stub.ListFeatureViews(fpb.ListFeatureViewsRequest(), timeout=10)
            view = next(v for v in views.views if v.name == VIEW)
            started = time.perf_counter()
            writer = [("authorization", f"Bearer {token}")]
            ingested = await asyncio.to_thread(feature_cli.ingest, stub, view, parquet, 1_000, 600.0, writer)
            seconds = time.perf_counter() - started
        out["ingest"] = {
            "rows": ingested.rows,
            "written": ingested.written,
            "rejected": ingested.rejected,
            "rows_per_s": round(ingested.rows / seconds),
        }
    finally:
        await asyncio.to_thread(service.stop)
    return out


async def main_async(options: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="feature-scale-") as temporary:
        root = Path(temporary)
        single = RedisServer(root / "single")
        single.start()
        try:
            results["1 shard"] = await measure(single.url, root / "single-run", options)
        finally:
            single.stop()
        cluster = RedisClusterServers(root / "cluster", shards=3)
        cluster.start()
        try:
            results["3 shards"] = await measure(cluster.url, root / "cluster-run", options)
        finally:
            cluster.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per read point")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--entities", type=lambda text: [int(v) for v in text.split(",")], default=[10, 100])
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the ingested Parquet file")
    parser.add_argument("--population", type=int, default=10_000, help="entities seeded per view")
    options = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(options)), indent=2))


if __name__ == "__main__":
    main()
