"""`make gameday` (`python -m bench.gameday`): inject each failure mode of OPERATIONS.md into a local mesh, one after
the other, and print the metric that reveals it (scraped from the services' /metrics), before and after.

Faults: shifted inputs (F2), a slow replica (F1), a Redis stall (F6), stale features (F5), overload (F3) and a
killed replica (F3/F6). Each is undone before the next (the slow replica restarts at full speed, the killed one
comes back). About a minute and a half on two cores; `--quick` sends fewer requests. Exit status 1 when a fault went
unrevealed. What to do when the alert behind each metric fires: docs/runbooks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import redis

from bench.environment import metric_sum, scrape
from bench.replay import INFER, fraud_request
from demo.mesh import ApiKey, LocalMesh, MeshOptions
from demo.processes import ServiceProcess

KEY = "im_gameday-key-0123456789abcdef"  # only for the mesh the game day starts itself, on loopback
MAX_INFLIGHT = 32  # the gateway's cap, low so that overload is cheap to reach
SLOW_MS = 60.0


@dataclass
class Reveal:
    fault: str
    metric: str
    before: float
    after: float
    revealed: bool
    note: str = ""


def metric(process: ServiceProcess | None, name: str, **labels: str) -> float:
    assert process is not None
    return metric_sum(scrape(process.metrics_port), name, **labels)


async def send(
    gateway: str, requests: int, concurrency: int = 8, amount_scale: float = 1.0, users: list[str] | None = None
) -> dict[str, int]:
    """`requests` fraud transactions through the gateway; the count of each status code."""
    rng = np.random.default_rng(requests)
    codes: dict[str, int] = {}
    metadata = (("authorization", f"Bearer {KEY}"),)
    async with grpc.aio.insecure_channel(gateway) as channel:
        infer = channel.unary_unary(INFER)
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                user = users[int(rng.integers(len(users)))] if users else f"u{int(rng.integers(1000))}"
                amount = float(rng.lognormal(3.5, 1.0)) * amount_scale
                encoded = fraud_request("", user, f"m{int(rng.integers(100))}", amount)
                try:
                    await infer(encoded, metadata=metadata, timeout=5)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


async def shifted_inputs(mesh: LocalMesh, scale: int) -> Reveal:
    await send(mesh.gateway_address, 150 * scale)  # the window fills with traffic like the training data's
    psi = "infermesh_feature_drift_psi"
    before = metric(mesh.router, psi, feature="amount")
    await send(mesh.gateway_address, 400 * scale, amount_scale=20.0)
    after = metric(mesh.router, psi, feature="amount")
    others = max(metric(mesh.router, psi, feature=f) for f in ("txn_count_1h", "account_age_days", "avg_ticket"))
    note = f"unshifted features stay at PSI <= {others:.3f}"
    return Reveal("shifted inputs (amount x20)", f'{psi}{{feature="amount"}}', before, after, after > 0.25, note)


async def slow_replica(mesh: LocalMesh, scale: int) -> Reveal:
    def mean_forward_ms(process: ServiceProcess) -> tuple[float, float]:
        text = scrape(process.metrics_port)
        return metric_sum(text, "infermesh_forward_seconds_sum"), metric_sum(text, "infermesh_forward_seconds_count")

    slow = await asyncio.to_thread(_restart_replica, mesh, 1, SLOW_MS)
    try:
        await replicas_up(mesh, 2)
        start, deadline = mean_forward_ms(slow), time.monotonic() + 20
        end = start
        while end[1] - start[1] < 5 and time.monotonic() < deadline:  # the router tries it now and then
            await send(mesh.gateway_address, 50 * scale, concurrency=4)
            end = mean_forward_ms(slow)
        calls = end[1] - start[1]
        after = (end[0] - start[0]) / calls * 1000 if calls else float("nan")
        hedges = metric(mesh.router, "infermesh_hedges_total")
    finally:
        await asyncio.to_thread(_restart_replica, mesh, 1, 0.0)
        await replicas_up(mesh, 2)
    fast = mean_forward_ms(mesh.model_services[0])
    before = fast[0] / fast[1] * 1000 if fast[1] else float("nan")
    note = f"before: replica 0; replica 1 took {calls:.0f} batches (the router steers away), {hedges:.0f} hedges"
    return Reveal(
        f"slow replica (+{SLOW_MS:g} ms per batch)",
        "mean infermesh_forward_seconds per batch (ms)",
        before,
        after,
        after > SLOW_MS * 0.8,
        note,
    )


async def replicas_up(mesh: LocalMesh, count: int, timeout_s: float = 20.0) -> None:
    """Until the router counts `count` healthy replicas (its health checks run every health_interval_s)."""
    deadline = time.monotonic() + timeout_s
    while metric(mesh.router, "infermesh_replicas_up") < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # another process's /metrics: no event to wait on


async def breakers_closed(mesh: LocalMesh, timeout_s: float = 20.0) -> None:
    """Until the router's circuit breakers are all closed again: a breaker closes on a successful probe, so a few
    requests go meanwhile (while Redis is still paused, each probe fails and the breaker stays open a while)."""
    deadline = time.monotonic() + timeout_s
    while metric(mesh.router, "infermesh_circuit_open") > 0 and time.monotonic() < deadline:
        await send(mesh.gateway_address, 2, concurrency=1)
        await asyncio.sleep(0.1)  # another process's /metrics: no event to wait on


def _restart_replica(mesh: LocalMesh, index: int, delay_ms: float) -> ServiceProcess:
    old = mesh.model_services[index]
    old.stop()
    old.settings["inject_delay_ms"] = delay_ms
    return mesh.restart(old)


async def redis_stall(mesh: LocalMesh, scale: int) -> Reveal:
    name = "infermesh_feature_defaults_used_total"
    before = metric(mesh.router, name, model="fraud")
    admin = redis.Redis.from_url(mesh.redis_url)
    await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", 2000, "ALL")  # answers, then stalls the rest
    codes = await send(mesh.gateway_address, 30 * scale, concurrency=4)
    after = metric(mesh.router, name, model="fraud")
    await breakers_closed(mesh)  # the next fault starts from a healthy mesh, not from a breaker still open
    note = f"answered {codes} (policy on_missing=default: flagged defaults, not errors)"
    return Reveal("Redis stall (CLIENT PAUSE 2 s)", f'{name}{{model="fraud"}}', before, after, after > before, note)


async def stale_features(mesh: LocalMesh, scale: int) -> Reveal:
    from demo import synthetic
    from feature_service.store import FeatureStore
    from feature_service.views import load_views

    users = [f"gameday-u{i}" for i in range(20)]
    world = synthetic.make_world()
    three_days_ago = int(time.time() * 1000) - 3 * 86_400_000  # the user view's max_age is one day
    store = await FeatureStore.open(mesh.redis_url, load_views(mesh.views_path))
    try:
        await store.load_scripts()
        names = list(synthetic.USER_FEATURES)
        rows = [(u, dict(zip(names, world.users[i], strict=True)), three_days_ago) for i, u in enumerate(users)]
        await store.write("user", rows)
    finally:
        await store.aclose()
    name = "infermesh_feature_stale_total"
    before = metric(mesh.feature_service, name, view="user")
    await send(mesh.gateway_address, 40 * scale, users=users)
    after = metric(mesh.feature_service, name, view="user")
    return Reveal("stale features (3 days old)", f'{name}{{view="user"}}', before, after, after > before)


async def overload(mesh: LocalMesh, scale: int) -> Reveal:
    name = "infermesh_admission_rejected_total"
    before = metric(mesh.gateway, name, service="gateway")
    codes = await send(mesh.gateway_address, 1500 * scale, concurrency=MAX_INFLIGHT * 8)
    after = metric(mesh.gateway, name, service="gateway")
    note = f"clients got {codes}"
    return Reveal(f"overload (c={MAX_INFLIGHT * 8}, cap {MAX_INFLIGHT})", name, before, after, after > before, note)


async def replica_kill(mesh: LocalMesh, scale: int) -> Reveal:
    name = "infermesh_replicas_up"
    before = metric(mesh.router, name)
    mesh.model_services[0].kill()
    after = before
    deadline = time.monotonic() + 10
    while after >= before and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the router's health checks notice within health_interval_s
        after = metric(mesh.router, name)
    codes = await send(mesh.gateway_address, 40 * scale)
    await asyncio.to_thread(mesh.restart_model_service, 0)
    await replicas_up(mesh, 2)
    return Reveal("replica kill (SIGKILL)", name, before, after, after < before, f"served meanwhile: {codes}")


FAULTS: tuple[Callable[[LocalMesh, int], Awaitable[Reveal]], ...] = (
    shifted_inputs,
    slow_replica,
    redis_stall,
    stale_features,
    overload,
    replica_kill,
)


def start(demo_dir: Path, run_dir: Path) -> LocalMesh:
    options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[ApiKey(KEY, "gameday", ["fraud"])],
        replicas=2,
        router={"drift_min_rows": 100, "drift_export_interval_s": 0, "drift_window_s": 3600, "drift_slots": 4},
        gateway={"max_inflight": MAX_INFLIGHT, "access_log_rate": 0},
    )
    return LocalMesh(options).start()


async def run(mesh: LocalMesh, scale: int) -> list[Reveal]:
    found = []
    for fault in FAULTS:
        started = time.perf_counter()
        reveal = await fault(mesh, scale)
        found.append(reveal)
        print(format_row(reveal) + f"  [{time.perf_counter() - started:.1f} s]", flush=True)
    return found


def format_row(reveal: Reveal) -> str:
    verdict = "REVEALED" if reveal.revealed else "NOT REVEALED"
    line = f"{verdict:>12}  {reveal.fault:<38} {reveal.metric}: {reveal.before:.4g} -> {reveal.after:.4g}"
    return line + (f"\n{'':14}{reveal.note}" if reveal.note else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gameday", description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path(".run/demo"))
    parser.add_argument("--quick", action="store_true", help="fewer requests per fault")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="infermesh-gameday-") as folder:
        started = time.perf_counter()
        mesh = start(args.demo_dir, Path(folder))
        print(f"mesh up in {time.perf_counter() - started:.1f} s; injecting {len(FAULTS)} faults", flush=True)
        try:
            found = asyncio.run(run(mesh, 1 if args.quick else 2))
        finally:
            mesh.stop()
    missed = [r.fault for r in found if not r.revealed]
    print(f"{len(found) - len(missed)} of {len(found)} faults revealed" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
