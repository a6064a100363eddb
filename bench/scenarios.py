"""The benchmark scenarios. Each is `async def scenario(ctx) -> dict` (JSON-ready): its runs, a summary of the
figures that answer its question, and any defect it saw (a failed request where none should fail, memory that
keeps growing, a hang).

Scenarios share one mesh (`ctx.mesh()`, started on first use, as `make run` starts it) unless they need a
differently configured one; the shared mesh is left as it was found (a killed replica or Redis is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import redis
import tritonclient.grpc.aio as aioclient

from bench import environment as env
from bench.loadgen import (
    OK,
    LoadRun,
    NoProgress,
    ProgressSink,
    Recording,
    Sample,
    closed_loop,
    nearest_rank,
    open_loop,
    result,
    summarize,
    timeline,
)
from bench.workloads import (
    MODEL_INFER,
    BenchMLPDirect,
    FeatureRead,
    FraudDirect,
    FraudViaGateway,
    FraudViaGatewayRaw,
    FraudViaHttp,
    malformed_requests,
)
from demo.mesh import LocalMesh
from demo.supervisor import Supervisor
from gateway.auth import new_api_key
from gateway.settings import GatewaySettings
from infermesh.model_config import MODEL_FILE, file_sha256, pin_version
from router.settings import RouterSettings

FEATURE_SHAPES = ((1, 10), (10, 10), (100, 10), (1, 50), (10, 50), (100, 50))  # (entities, features)


@dataclass(frozen=True)
class BenchOptions:
    duration_s: float = 5.0  # measurement window of each sweep point
    warmup_s: float = 1.0
    concurrency: tuple[int, ...] = (1, 8, 32, 64, 128)
    feature_concurrency: tuple[int, ...] | None = None  # default: `concurrency`
    open_loop_fraction: float = 0.5  # open-loop rate as a share of the capacity measured in the sweep
    fault_duration_s: float = 24.0  # failover / outage / model-change runs (the fault happens inside)
    model_change_concurrency: int = 16
    stall_s: float = 3.0  # Redis paused (CLIENT PAUSE) this long in scenario 12
    stall_p99_budget_ms: float = 150.0
    fault_concurrency: int = 16
    slow_delay_ms: float = 25.0  # scenario 6: extra time per batch on the slow replica
    slow_concurrency: tuple[int, ...] = (1, 8, 32)
    p99_budget_ms: float = 50.0  # scenario 3: throughput compared at the highest concurrency within this p99
    batching_concurrency: int = 32
    batching_sweep: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128)
    feature_population: int = env.WIDE_POPULATION  # scenario 2: entities per bench view
    mesh_warmup_s: float = 3.0  # load through a freshly started mesh before measuring anything on it
    overload_factor: float = 3.0
    overload_duration_s: float = 10.0
    overload_rounds: int = 3  # rounds after idle pauses: memory that grows after every round would be a leak
    device: str = "auto"  # scenario 3's model service device (cpu / cuda / auto)
    # Scenario 8: tenant "calm" (no quota) at calm_concurrency, tenant "flood" at flood_factor x its quota. On
    # 2 cores the gateway path answers ~550 `fraud` req/s at c=8 (scenario 1): a 50 req/s quota is a tenth of
    # it, and the flood's 500 req/s, mostly refused, must cost little enough not to take the cores from calm.
    calm_concurrency: int = 8
    flood_rate_per_s: float = 50.0
    flood_burst: int = 50
    flood_max_inflight: int = 8
    flood_factor: float = 10.0
    malformed_requests: int = 50  # scenario 9: requests of each malformed kind
    soak_s: float = 300.0  # scenario 10: how long `fraud` runs through the gateway at soak_concurrency
    soak_concurrency: int = 64
    priority_concurrency: tuple[int, int] = (16, 112)  # scenario 14: clients at priority 1, at the default level
    priority_model_delay_ms: float = 5.0  # scenario 14: added to each model batch, to make the model the bottleneck
    priority_max_batch: int = 16  # scenario 14: `fraud`'s max_batch_size there
    quick: bool = False

    def flood_quota(self) -> dict[str, float]:
        """Tenant "flood"'s quota in the shared mesh's key file."""
        return {"rate_per_s": self.flood_rate_per_s, "burst": self.flood_burst, "max_inflight": self.flood_max_inflight}

    @classmethod
    def quick_mode(cls) -> BenchOptions:
        return cls(
            duration_s=0.7,
            warmup_s=0.15,
            concurrency=(1, 32),
            feature_concurrency=(8,),
            fault_duration_s=5.5,
            slow_concurrency=(8,),
            batching_sweep=(32,),
            overload_duration_s=1.0,
            overload_rounds=1,
            mesh_warmup_s=0.5,
            feature_population=2_000,
            malformed_requests=10,
            soak_s=4.0,
            priority_concurrency=(4, 60),
            quick=True,
        )


@dataclass
class Context:
    """What a scenario needs: options, folders, the shared mesh, progress reporting and a log."""

    demo_dir: Path
    run_dir: Path
    options: BenchOptions = field(default_factory=BenchOptions)
    progress: ProgressSink = field(default_factory=NoProgress)
    log: Callable[[str], None] = lambda message: None
    api_key: str = field(default_factory=new_api_key)
    # Scenario 8's tenants in the shared mesh, allowed `fraud`: "calm" without a quota, "flood" with one.
    tenant_keys: dict[str, str] = field(
        default_factory=lambda: {"calm": new_api_key(), env.FLOOD_TENANT: new_api_key()}
    )
    shared_mesh: LocalMesh | None = None  # given (tests) or started on first use
    _owns_mesh: bool = False

    async def mesh(self) -> LocalMesh:
        if self.shared_mesh is None:
            self.log("starting the mesh: private redis, feature service, 2 model replicas, router, gateway")
            self.shared_mesh = await asyncio.to_thread(
                env.start_mesh,
                self.demo_dir,
                self.run_dir / "mesh",
                self.api_key,
                tenant_keys=self.tenant_keys,
                tenants={env.FLOOD_TENANT: self.options.flood_quota()},
            )
            self._owns_mesh = True
            await self.warm(self.shared_mesh)
        return self.shared_mesh

    async def warm(self, mesh: LocalMesh) -> None:
        """A fresh mesh is slower for its first seconds (connections, caches, allocators): load it first."""
        if self.options.mesh_warmup_s <= 0:
            return
        async with _client(mesh.gateway_address) as client:
            await closed_loop(FraudViaGateway(client, self.api_key), 8, self.options.mesh_warmup_s, 0.0)

    @contextlib.asynccontextmanager
    async def dedicated_mesh(self, name: str, **options: Any):
        self.log(f"starting a dedicated mesh ({name})")
        mesh = await asyncio.to_thread(env.start_mesh, self.demo_dir, self.run_dir / name, self.api_key, **options)
        try:
            await self.warm(mesh)
            yield mesh
        finally:
            await asyncio.to_thread(env.stop_mesh, mesh)

    async def close(self) -> None:
        if self._owns_mesh and self.shared_mesh is not None:
            await asyncio.to_thread(env.stop_mesh, self.shared_mesh)
            self.shared_mesh = None
            self._owns_mesh = False

    async def closed(self, send, concurrency: int, label: str, **kwargs: Any) -> Recording:
        options = self.options
        kwargs.setdefault("duration_s", options.duration_s)
        kwargs.setdefault("warmup_s", options.warmup_s)
        return await closed_loop(send, concurrency, label=label, progress=self.progress, **kwargs)

    async def open(self, send, rate_rps: float, label: str, **kwargs: Any) -> Recording:
        options = self.options
        kwargs.setdefault("duration_s", options.duration_s)
        kwargs.setdefault("warmup_s", options.warmup_s)
        return await open_loop(send, rate_rps, label=label, progress=self.progress, **kwargs)


def _run(recording: Recording, series: str, **extra: Any) -> dict[str, Any]:
    out = result(recording)
    out["series"] = series
    out.update(extra)
    return out


def _client(address: str) -> aioclient.InferenceServerClient:
    return aioclient.InferenceServerClient(address)


def _capacity(runs: list[dict[str, Any]], series: str) -> float:
    return max((r["throughput_rps"] for r in runs if r["series"] == series and r["mode"] == "closed"), default=0.0)


def _point(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run that go into a summary table."""
    latency = run["latency_ms"]
    return {
        "throughput_rps": run["throughput_rps"],
        "p50_ms": latency["p50"],
        "p90_ms": latency["p90"],
        "p99_ms": latency["p99"],
        "errors": sum(run["errors"].values()),
    }


def _unexpected_errors(runs: list[dict[str, Any]], allowed: tuple[str, ...] = ()) -> str:
    """Which runs failed requests they should not have, with the servers' messages ("" when none did)."""
    found = []
    for run in runs:
        errors = {code: count for code, count in run["errors"].items() if code not in allowed}
        if errors:
            examples = {code: run.get("error_examples", {}).get(code) for code in errors}
            found.append(f"{run['label']}: {errors} of {run['requests']} (messages {examples})")
    return "; ".join(found)


def _phases(samples: list[Sample], fault: float, back: float, end: float) -> dict[str, list[Sample]]:
    """before: answered before the fault; during: answered after the fault began and sent before things were
    back; after: sent once things were back. Every request lands in exactly one."""
    return {
        "before": [s for s in samples if s.end < fault],
        "during": [s for s in samples if s.end >= fault and s.start < back],
        "after": [s for s in samples if s.start >= back],
    }


def _phase(chosen: list[Sample], start: float, end: float) -> dict[str, Any]:
    out = summarize(chosen, (start, max(end, start)))
    out["from_s"], out["to_s"] = round(start, 3), round(end, 3)
    failed = sorted((s.end - s.start) * 1000 for s in chosen if s.code != OK)
    out["failed_latency_ms"] = {"p50": _r(nearest_rank(failed, 50)), "p99": _r(nearest_rank(failed, 99))}
    return out


def _r(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def _logged_errors(log_path: Path) -> dict[str, int]:
    """Warnings and errors in a service's JSON log, counted by message and error type."""
    found: dict[str, int] = {}
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            key = f"{entry.get('msg')} ({entry.get('error', entry.get('level'))})"
            found[key] = found.get(key, 0) + 1
    return found


# 1. Mesh overhead ----------------------------------------------------------------------------------------


async def mesh_overhead(ctx: Context) -> dict[str, Any]:
    """`fraud` straight to one replica with the assembled [1, 13] tensor vs through the gateway with ids."""
    mesh = await ctx.mesh()
    options = ctx.options
    runs: list[dict[str, Any]] = []
    async with _client(mesh.model_services[0].address) as direct_client, _client(mesh.gateway_address) as gw_client:
        direct = FraudDirect(direct_client)
        gateway = FraudViaGateway(gw_client, ctx.api_key)
        for concurrency in options.concurrency:
            for series, send in (("direct to replica", direct), ("through gateway", gateway)):
                recording = await ctx.closed(send, concurrency, f"overhead · {series} · c={concurrency}")
                runs.append(_run(recording, series))
        # Open loop at one fixed rate for both paths: the gateway path's measured capacity x fraction.
        rate = max(1.0, _capacity(runs, "through gateway") * options.open_loop_fraction)
        for series, send in (("direct to replica", direct), ("through gateway", gateway)):
            recording = await ctx.open(send, rate, f"overhead · {series} · {rate:.0f} req/s Poisson")
            runs.append(_run(recording, series))

    def by(series: str, mode: str, concurrency: int | None = None) -> dict[str, Any]:
        return next(
            r
            for r in runs
            if r["series"] == series
            and r["mode"] == mode
            and (concurrency is None or r.get("concurrency") == concurrency)
        )

    rows = []
    for concurrency in [*options.concurrency, None]:
        mode = "closed" if concurrency is not None else "open"
        a, b = by("direct to replica", mode, concurrency), by("through gateway", mode, concurrency)
        pa, pb = _point(a), _point(b)
        rows.append(
            {
                "load": f"c={concurrency}" if concurrency is not None else f"{a['rate_rps']:.0f} req/s open",
                "direct": pa,
                "gateway": pb,
                "added_p50_ms": _sub(pb["p50_ms"], pa["p50_ms"]),
                "added_p99_ms": _sub(pb["p99_ms"], pa["p99_ms"]),
            }
        )
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": {"rows": rows},
        "defects": [f"failed requests without any fault: {unexpected}"] if unexpected else [],
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b and not (math.isnan(a) or math.isnan(b)) else None


def _sub(a: float, b: float) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return round(a - b, 3)


# 2. Feature fetch alone ----------------------------------------------------------------------------------


async def feature_fetch(ctx: Context) -> dict[str, Any]:
    """BatchReadFeatures of 1/10/100 entities x 10/50 features against a feature service on the mesh's Redis."""
    mesh = await ctx.mesh()
    options = ctx.options
    folder = ctx.run_dir / "features"
    views_path = env.write_wide_views(folder / "feature_views.json")
    written = await env.seed_wide_views(mesh.redis_url, views_path, population=options.feature_population)
    ctx.log(f"seeded {written} rows of the bench feature views")
    service = env.start_service(
        "feature_service", "feature_service_bench", folder, {"redis_url": mesh.redis_url, "views_path": views_path}
    )
    runs: list[dict[str, Any]] = []
    try:
        await env.wait_ready(service)
        concurrencies = options.feature_concurrency or options.concurrency
        async with grpc.aio.insecure_channel(service.address) as channel:
            for entities, width in FEATURE_SHAPES:
                view = f"bench{width}"
                send = FeatureRead(
                    channel,
                    view,
                    env.wide_feature_names(view),
                    entities,
                    population=options.feature_population,
                    id_prefix="e",
                )
                series = f"{entities} entities x {width} features"
                for concurrency in concurrencies:
                    recording = await ctx.closed(send, concurrency, f"features · {series} · c={concurrency}")
                    runs.append(_run(recording, series, entities=entities, features=width))
    finally:
        await asyncio.to_thread(service.stop)
    rows = []
    for entities, width in FEATURE_SHAPES:
        mine = [r for r in runs if r["entities"] == entities and r["features"] == width]
        lowest = min(mine, key=lambda r: r["concurrency"])
        best = max(mine, key=lambda r: r["throughput_rps"])
        rows.append(
            {
                "entities": entities,
                "features": width,
                "concurrency_low": lowest["concurrency"],
                "low": _point(lowest),
                "best_concurrency": best["concurrency"],
                "best": _point(best),
                "entities_per_s": round(best["throughput_rps"] * entities),
            }
        )
    not_found = sum(r["tags"].get("not_found", 0) for r in runs)
    defects = []
    unexpected = _unexpected_errors(runs)
    if unexpected:
        causes = _logged_errors(service.log_path)
        defects.append(f"failed feature reads without any fault: {unexpected}; the feature service logged {causes}")
    if not_found:
        defects.append(f"{not_found} reads answered NOT_FOUND for seeded entities")
    return {"runs": runs, "summary": {"population": options.feature_population, "rows": rows}, "defects": defects}


# 3. Dynamic batching -------------------------------------------------------------------------------------


async def _batch_stats(process) -> tuple[float, float]:
    try:
        text = await asyncio.to_thread(env.scrape, process.metrics_port)
    except OSError:
        return math.nan, math.nan
    return (
        env.metric_sum(text, "infermesh_batch_size_sum", model="bench_mlp"),
        env.metric_sum(text, "infermesh_batch_size_count", model="bench_mlp"),
    )


async def dynamic_batching(ctx: Context) -> dict[str, Any]:
    """`bench_mlp` straight to one model service: batching off vs on, concurrency sweep, same p99 budget."""
    options = ctx.options
    folder = ctx.run_dir / "batching"
    services = {}
    configs = {}
    for mode, enabled in (("batching off", False), ("batching on", True)):
        target = folder / ("on" if enabled else "off")
        repository = env.bench_repository(ctx.demo_dir, target, bench_mlp_batching=enabled)
        configs[mode] = env.bench_mlp_settings(repository)
        services[mode] = env.start_service(
            "model_service",
            f"model_service_{'on' if enabled else 'off'}",
            target,
            {"model_repository": repository, "device": options.device, "replica_id": mode.replace(" ", "_")},
        )
    runs: list[dict[str, Any]] = []
    try:
        await env.wait_ready(*services.values())
        concurrencies = sorted({*options.batching_sweep, options.batching_concurrency})
        for mode, service in services.items():
            async with _client(service.address) as client:
                send = BenchMLPDirect(client)
                for concurrency in concurrencies:
                    before = await _batch_stats(service)
                    recording = await ctx.closed(send, concurrency, f"batching · {mode} · c={concurrency}")
                    after = await _batch_stats(service)
                    rows = after[0] - before[0]
                    batches = after[1] - before[1]
                    mean_batch = round(rows / batches, 2) if batches else None
                    runs.append(_run(recording, mode, mean_batch_rows=mean_batch))
    finally:
        await asyncio.to_thread(env.stop_all, list(services.values()))
    budget = options.p99_budget_ms
    summary: dict[str, Any] = {"p99_budget_ms": budget, "device": options.device, "configs": configs, "modes": {}}
    for mode in services:
        mine = sorted((r for r in runs if r["series"] == mode), key=lambda r: r["concurrency"])
        at_c = next(r for r in mine if r["concurrency"] == options.batching_concurrency)
        within = [r for r in mine if not math.isnan(r["latency_ms"]["p99"]) and r["latency_ms"]["p99"] <= budget]
        best = max(within, key=lambda r: r["concurrency"]) if within else None
        summary["modes"][mode] = {
            "at_concurrency": options.batching_concurrency,
            "at": {**_point(at_c), "mean_batch_rows": at_c["mean_batch_rows"]},
            "within_budget_concurrency": best["concurrency"] if best else None,
            "within_budget": {**_point(best), "mean_batch_rows": best["mean_batch_rows"]} if best else None,
        }
    off, on = summary["modes"]["batching off"], summary["modes"]["batching on"]
    if off["within_budget"] and on["within_budget"]:
        summary["speedup_within_budget"] = round(
            on["within_budget"]["throughput_rps"] / max(off["within_budget"]["throughput_rps"], 1e-9), 2
        )
    summary["speedup_at_concurrency"] = round(on["at"]["throughput_rps"] / max(off["at"]["throughput_rps"], 1e-9), 2)
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": summary,
        "defects": [f"failed requests without any fault: {unexpected}"] if unexpected else [],
    }


# 4. Failover ---------------------------------------------------------------------------------------------


class _Timed:
    """Runs a load and a fault script side by side; the script's events land on the load's clock."""

    def __init__(self) -> None:
        self.runs: list[LoadRun] = []
        self.ready = asyncio.Event()

    def started(self, run: LoadRun) -> None:
        self.runs.append(run)
        self.ready.set()

    async def at(self, t: float) -> None:
        """Sleep until `t` seconds after the first load's window start."""
        await self.ready.wait()
        delay = t - self.runs[0].now()
        if delay > 0:
            await asyncio.sleep(delay)

    def mark(self, what: str) -> float:
        for run in self.runs:
            run.mark(what)
        return self.runs[0].now()


async def failover(ctx: Context) -> dict[str, Any]:
    """Two replicas under steady load through the gateway; SIGKILL one mid-run. As under `make run`, the
    supervisor (demo.supervisor) notices and starts it again on its old ports; nothing else does."""
    mesh = await ctx.mesh()
    options = ctx.options
    duration = options.fault_duration_s
    clock = _Timed()
    times: dict[str, float] = {}
    served_after_restart: dict[str, float] = {}
    supervisor = Supervisor(mesh, say=lambda line: ctx.log(f"failover: supervisor: {line}"))
    victim_name = mesh.model_services[0].name
    supervising, restarted = asyncio.Event(), asyncio.Event()

    async def supervise() -> None:
        while not supervising.is_set():
            await asyncio.to_thread(supervisor.check)  # a restart blocks until the replica is ready
            if supervisor.restarts.get(victim_name):
                restarted.set()
            await asyncio.sleep(0.1)

    async def script() -> None:
        await clock.at(duration * 0.2)
        mesh.model_services[0].kill()
        times["kill"] = clock.mark("SIGKILL replica 0")
        ctx.log(f"failover: replica 0 SIGKILLed at t={times['kill']:.2f}s")
        await restarted.wait()
        times["ready"] = clock.mark("replica 0 ready (restarted by the supervisor)")
        ctx.log(f"failover: replica 0 ready again at t={times['ready']:.2f}s")
        served_after_restart["start"] = await env.served_infers(mesh.model_services[0])

    watcher = asyncio.create_task(supervise())
    async with _client(mesh.gateway_address) as client:
        send = FraudViaGateway(client, ctx.api_key)
        fault = asyncio.create_task(script())
        recording = await ctx.closed(
            send,
            options.fault_concurrency,
            f"failover · c={options.fault_concurrency}",
            duration_s=duration,
            started=clock.started,
        )
        await fault
    supervising.set()
    await watcher
    served_after_restart["end"] = await env.served_infers(mesh.model_services[0])
    samples = recording.measured()
    split = _phases(samples, times["kill"], times["ready"], duration)
    phases = {
        "before": _phase(split["before"], 0.0, times["kill"]),
        "fault": _phase(split["during"], times["kill"], times["ready"]),
        "after": _phase(split["after"], times["ready"], duration),
    }
    total = summarize(samples, (0.0, duration))
    restarted_served = served_after_restart["end"] - served_after_restart["start"]
    run = _run(recording, "gateway under failover")
    defects = []
    if total["errors"]:
        failed = [s for s in samples if s.code != OK]
        first, last = min(s.end for s in failed), max(s.end for s in failed)
        defects.append(
            f"failover: {sum(total['errors'].values())} of {total['requests']} requests failed "
            f"{total['errors']} between t={first:.2f}s and t={last:.2f}s (replica 0 SIGKILLed at "
            f"t={times['kill']:.2f}s, back at t={times['ready']:.2f}s)"
        )
    # The router finds a restarted replica by its health probe (every 1 s) once its ejection (2 s) is over.
    if not restarted_served > 0 and duration - times["ready"] >= 4.0:
        defects.append(
            f"failover: the restarted replica received no traffic in the {duration - times['ready']:.1f} s "
            "between its restart and the end of the run"
        )
    return {
        "runs": [run],
        "summary": {
            "concurrency": options.fault_concurrency,
            "events_s": {k: round(v, 3) for k, v in times.items()},
            "failed": sum(total["errors"].values()),
            "errors": total["errors"],
            "requests": total["requests"],
            "phases": {name: _phase_point(phase) for name, phase in phases.items()},
            "restarted_replica_served": restarted_served,
        },
        "timelines": {"gateway under failover": timeline(recording)},
        "defects": defects,
    }


def _phase_point(phase: dict[str, Any]) -> dict[str, Any]:
    return {
        "from_s": phase["from_s"],
        "to_s": phase["to_s"],
        "requests": phase["requests"],
        "ok": phase["ok"],
        "errors": phase["errors"],
        "tags": phase["tags"],
        "throughput_rps": phase["throughput_rps"],
        "p50_ms": phase["latency_ms"]["p50"],
        "p99_ms": phase["latency_ms"]["p99"],
        "failed_p50_ms": phase["failed_latency_ms"]["p50"],
        "failed_p99_ms": phase["failed_latency_ms"]["p99"],
    }


# 5. Feature store outage ---------------------------------------------------------------------------------


RECOVERY_SLACK_S = 0.25  # after the breaker's open interval: the probe's round trip, the feature service reconnecting


async def feature_store_outage(ctx: Context) -> dict[str, Any]:
    """Redis SIGKILLed mid-run and started again (its data saved first, as RDB persistence would have):
    `fraud` (on_missing=default) and `fraud_strict` (on_missing=reject) under load side by side."""
    mesh = await ctx.mesh()
    assert mesh.redis is not None, "the outage scenario needs the mesh's private redis-server"
    options = ctx.options
    duration = options.fault_duration_s
    clock = _Timed()
    times: dict[str, float] = {}
    per_policy = max(1, options.fault_concurrency // 2)

    async def script() -> None:
        await clock.at(duration * 0.25)
        admin = redis.Redis.from_url(mesh.redis_url)
        try:
            await asyncio.to_thread(admin.save)  # what is on disk comes back after the restart
        finally:
            admin.close()
        mesh.redis.kill()
        times["kill"] = clock.mark("SIGKILL redis")
        ctx.log(f"outage: redis SIGKILLed at t={times['kill']:.2f}s")
        await clock.at(duration * 0.5)
        times["restart"] = clock.mark("restart redis")
        await asyncio.to_thread(mesh.redis.restart_same_port)
        times["back"] = clock.mark("redis back")
        ctx.log(f"outage: redis answering again at t={times['back']:.2f}s")

    async with _client(mesh.gateway_address) as client:
        loads = {
            "default": FraudViaGateway(client, ctx.api_key, "fraud", seed=1),
            "reject": FraudViaGateway(client, ctx.api_key, "fraud_strict", seed=2),
        }
        fault = asyncio.create_task(script())
        recordings = await asyncio.gather(
            *(
                ctx.closed(
                    send, per_policy, f"outage · {policy} · c={per_policy}", duration_s=duration, started=clock.started
                )
                for policy, send in loads.items()
            )
        )
        await fault
    policies: dict[str, Any] = {}
    runs = []
    timelines = {}
    defects = []
    # Until a probe of the router's open breaker finds Redis back, reads stay short-circuited: by design, so a tail
    # of one open interval (and the probe's own round trip) after "back" is expected; longer is not.
    breaker_open_s = float(
        mesh.options.router.get("feature_breaker_open_s", RouterSettings.model_fields["feature_breaker_open_s"].default)
    )
    allowed_s = breaker_open_s + RECOVERY_SLACK_S
    for policy, recording in zip(loads, recordings, strict=True):
        # Events were marked on the first load's clock; both loads started together (within microseconds).
        offset = recording.origin - clock.runs[0].origin
        kill, back = times["kill"] - offset, times["back"] - offset
        samples = recording.measured()
        bad = [s for s in samples if s.code != OK or s.tag == "features_unavailable"]
        after_back_bad = [s for s in bad if s.end >= back]
        clean_after = [s for s in samples if s.start >= back and s.code == OK and s.tag is None]
        split = _phases(samples, kill, back, duration)
        policies[policy] = {
            "model": loads[policy].model,
            "phases": {
                "before": _phase_point(_phase(split["before"], 0.0, kill)),
                "outage": _phase_point(_phase(split["during"], kill, back)),
                "after": _phase_point(_phase(split["after"], back, duration)),
            },
            # Recovery: from Redis answering again until the last failed or flagged answer (0: none after it).
            "recovery_s": round(max(0.0, max((s.end for s in after_back_bad), default=back) - back), 3),
            "first_clean_after_s": round(min(s.end for s in clean_after) - back, 3) if clean_after else None,
        }
        runs.append(_run(recording, f"policy {policy}"))
        timelines[f"policy {policy}"] = timeline(recording)
        before = policies[policy]["phases"]["before"]
        if before["errors"]:
            defects.append(f"outage/{policy}: {before['errors']} failed before the fault")
        after = policies[policy]["phases"]["after"]
        failed_after = after["errors"] or after["tags"].get("features_unavailable")
        if failed_after and policies[policy]["recovery_s"] > allowed_s:
            defects.append(
                f"outage/{policy}: after Redis was back, {after['errors']} failed and "
                f"{after['tags'].get('features_unavailable', 0)} were flagged unavailable; "
                f"recovery took {policies[policy]['recovery_s']}s (the breaker's probes allow {allowed_s:g}s)"
            )
    outage_default = policies["default"]["phases"]["outage"]
    if outage_default["errors"]:
        defects.append(
            "outage/default: policy `default` failed "
            f"{sum(outage_default['errors'].values())} requests {outage_default['errors']} while Redis was down "
            "instead of answering with the views' defaults flagged `infermesh_features_unavailable`"
        )
    outage_reject = policies["reject"]["phases"]["outage"]
    if outage_reject["ok"] and not outage_reject["errors"]:
        defects.append("outage/reject: policy `reject` kept answering while Redis was down")
    slow_fail = outage_reject["failed_p99_ms"]
    if slow_fail is not None and slow_fail > 250:
        defects.append(f"outage/reject: failures are not fast (p99 {slow_fail} ms)")
    return {
        "runs": runs,
        "summary": {
            "concurrency_per_policy": per_policy,
            "events_s": {k: round(v, 3) for k, v in times.items()},
            "policies": policies,
            "breaker_open_s": breaker_open_s,
        },
        "timelines": timelines,
        "defects": defects,
    }


# 6. Slow replica -----------------------------------------------------------------------------------------


async def slow_replica(ctx: Context) -> dict[str, Any]:
    """Replica 1 made slow (MODEL_SERVICE_INJECT_DELAY_MS per batch) vs the healthy mesh, same load."""
    options = ctx.options
    delay = options.slow_delay_ms
    runs: list[dict[str, Any]] = []

    async def sweep(mesh: LocalMesh, series: str) -> None:
        async with _client(mesh.gateway_address) as client:
            send = FraudViaGateway(client, ctx.api_key)
            for concurrency in options.slow_concurrency:
                before = [await env.served_infers(p) for p in mesh.model_services]
                recording = await ctx.closed(send, concurrency, f"slow replica · {series} · c={concurrency}")
                after = [await env.served_infers(p) for p in mesh.model_services]
                served = [a - b for a, b in zip(after, before, strict=True)]
                share = round(served[1] / sum(served), 3) if sum(served) > 0 else None
                runs.append(_run(recording, series, replica_calls=served, share_to_replica_1=share))

    healthy_series, slow_series = "both replicas healthy", f"replica 1 +{delay:g} ms"
    unhedged_series = f"replica 1 +{delay:g} ms, no hedging"
    await sweep(await ctx.mesh(), healthy_series)
    async with ctx.dedicated_mesh("slow", per_replica={1: {"inject_delay_ms": delay}}) as slow_mesh:
        await sweep(slow_mesh, slow_series)
    unhedged = {"per_replica": {1: {"inject_delay_ms": delay}}, "router": {"hedge_max_ratio": 0.0}}
    async with ctx.dedicated_mesh("slow-unhedged", **unhedged) as unhedged_mesh:
        await sweep(unhedged_mesh, unhedged_series)
    rows = []
    for concurrency in options.slow_concurrency:

        def at(series: str, concurrency: int = concurrency) -> dict[str, Any]:
            return next(r for r in runs if r["series"] == series and r["concurrency"] == concurrency)

        healthy, slow, plain = at(healthy_series), at(slow_series), at(unhedged_series)
        rows.append(
            {
                "concurrency": concurrency,
                "healthy": _point(healthy),
                "slow": _point(slow),
                "slow_unhedged": _point(plain),
                "share_to_slow_replica": slow["share_to_replica_1"],
                "added_p50_ms": _sub(slow["latency_ms"]["p50"], healthy["latency_ms"]["p50"]),
                "added_p99_ms": _sub(slow["latency_ms"]["p99"], healthy["latency_ms"]["p99"]),
                "p99_vs_healthy": _ratio(slow["latency_ms"]["p99"], healthy["latency_ms"]["p99"]),
                "p99_vs_healthy_unhedged": _ratio(plain["latency_ms"]["p99"], healthy["latency_ms"]["p99"]),
            }
        )
    unexpected = _unexpected_errors(runs)
    findings = [
        f"slow replica: at c={row['concurrency']} one replica {delay:g} ms slower raised p99 from "
        f"{row['healthy']['p99_ms']:.0f} to {row['slow']['p99_ms']:.0f} ms "
        f"({100 * (row['share_to_slow_replica'] or 0):.0f} % of model calls still went to it)"
        for row in rows
        if row["slow"]["p99_ms"] > 2 * row["healthy"]["p99_ms"]
        and row["slow"]["p99_ms"] - row["healthy"]["p99_ms"] > delay
    ]
    return {
        "runs": runs,
        "findings": findings,
        "summary": {"delay_ms": delay, "rows": rows},
        "defects": [f"failed requests with a slow replica: {unexpected}"] if unexpected else [],
    }


# 7. Overload ---------------------------------------------------------------------------------------------


async def _sample_memory(pids: dict[str, int], peaks: dict[str, float], stop: asyncio.Event) -> None:
    """VmRSS of every process every 0.25 s until `stop`; keeps the highest seen in `peaks`."""
    while not stop.is_set():
        for name, pid in pids.items():
            peaks[name] = max(peaks[name], env.memory_mib(pid).get("VmRSS", 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def overload(ctx: Context) -> dict[str, Any]:
    """Open-loop load at `overload_factor` x the measured capacity, in rounds with an idle pause between them:
    shed fraction, p99 of the accepted requests, and the RSS of every process (peak, and idle after each
    round: memory that keeps growing round after round would be a leak)."""
    mesh = await ctx.mesh()
    options = ctx.options
    pids = env.mesh_pids(mesh)
    runs: list[dict[str, Any]] = []
    idle_s = 2.0 if options.overload_rounds > 1 else 1.0
    peaks: dict[str, float] = {name: 0.0 for name in pids}
    idle_after: list[dict[str, dict[str, float]]] = []
    async with _client(mesh.gateway_address) as client:
        send = FraudViaGateway(client, ctx.api_key, seed=3)
        probe_concurrency = max(options.concurrency)
        probe = await ctx.closed(send, probe_concurrency, f"overload · capacity probe · c={probe_concurrency}")
        runs.append(_run(probe, "capacity probe"))
        capacity = runs[0]["throughput_rps"]
        rate = max(1.0, capacity * options.overload_factor)
        idle_before = {name: env.memory_mib(pid) for name, pid in pids.items()}
        for round_ in range(1, options.overload_rounds + 1):
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_memory(pids, peaks, stop))
            try:
                recording = await ctx.open(
                    send,
                    rate,
                    f"overload · round {round_} · {options.overload_factor:g}x capacity ≈ {rate:.0f} req/s",
                    duration_s=options.overload_duration_s,
                    seed=round_,
                )
            finally:
                stop.set()
                await sampler
            runs.append(_run(recording, "overload", round=round_))
            await asyncio.sleep(idle_s)  # idle again: does memory come back down?
            idle_after.append({name: env.memory_mib(pid) for name, pid in pids.items()})
    main = runs[1]
    rounds = runs[1:]
    memory = {
        name: {
            "idle_before_mib": idle_before[name].get("VmRSS"),
            "peak_sampled_mib": peaks[name],
            "idle_after_rounds_mib": [after[name].get("VmRSS") for after in idle_after],
            "vmhwm_mib": idle_after[-1][name].get("VmHWM"),
        }
        for name in pids
    }
    per_round = []
    for run in rounds:
        # Two ways the gateway refuses at once: RESOURCE_EXHAUSTED from its admission bound, and CANCELLED from
        # gRPC core when its backlog of calls not yet picked up by Python is full (max_pending_rpcs).
        shed = run["errors"].get("RESOURCE_EXHAUSTED", 0) + run["errors"].get("CANCELLED", 0)
        per_round.append(
            {
                "round": run["round"],
                "offered_rps": run["offered_rps"],
                "requests": run["requests"],
                "accepted_ok": run["ok"],
                "shed": shed,
                "shed_fraction": round(shed / run["requests"], 4) if run["requests"] else None,
                "shed_by_admission": run["errors"].get("RESOURCE_EXHAUSTED", 0),
                "shed_by_grpc_backlog": run["errors"].get("CANCELLED", 0),
                "other_errors": {
                    k: v for k, v in run["errors"].items() if k not in ("RESOURCE_EXHAUSTED", "CANCELLED")
                },
                "error_examples": run.get("error_examples", {}),
                "accepted_throughput_rps": run["throughput_rps"],
                "accepted_p50_ms": run["latency_ms"]["p50"],
                "accepted_p99_ms": run["latency_ms"]["p99"],
                "accepted_p99_from_send_ms": run["latency_from_send_ms"]["p99"],
                "generator_lag_p99_ms": run["send_lag_ms_p99"],
            }
        )
    defects = []
    findings = []
    others = [r for r in per_round if r["other_errors"]]
    if others:
        total = sum(r["requests"] for r in per_round)
        codes: dict[str, int] = {}
        for r in others:
            for code, count in r["other_errors"].items():
                codes[code] = codes.get(code, 0) + count
        defects.append(
            f"overload: {sum(codes.values())} of {total} requests at {options.overload_factor:g}x capacity ended "
            f"{codes} instead of a shed (messages: "
            f"{ {code: r['error_examples'].get(code) for r in others for code in r['other_errors']} }); "
            "the gateway's own request counter does not count them, so they never reached its handler"
        )
    # The mesh's share of the wait counts from the actual send: when the generator (on the same cores) cannot
    # offer the rate, latency from the scheduled arrival is mostly its own lag.
    slowest = max(r["accepted_p99_from_send_ms"] or 0 for r in per_round)
    if slowest > 1000:
        findings.append(
            f"overload: accepted requests waited up to p99 {slowest / 1000:.1f} s from their send at "
            f"{options.overload_factor:g}x capacity ({capacity:.0f} req/s): shedding at the gateway's in-flight "
            "bound does not bound latency"
        )
    lag = max(r["generator_lag_p99_ms"] or 0 for r in per_round)
    if lag > 1000:
        findings.append(
            f"overload: the load generator could not offer {rate:.0f} req/s on these cores (it sent p99 "
            f"{lag / 1000:.1f} s late), so latency from the scheduled arrival is mostly its own lag; from the "
            f"actual send the accepted requests' p99 was at most {slowest:.0f} ms"
        )
    for name, figures in memory.items():
        series = [v for v in figures["idle_after_rounds_mib"] if v is not None]
        steps = [b - a for a, b in itertools.pairwise(series)]
        if len(series) >= 3 and all(step > 5.0 for step in steps) and series[-1] - series[0] > 20.0:
            defects.append(f"overload: {name} idle RSS grew after every round: {series} MiB")
    return {
        "runs": runs,
        "summary": {
            "capacity_rps": capacity,
            "probe_concurrency": probe_concurrency,
            "factor": options.overload_factor,
            "target_rps": round(rate, 1),
            "offered_rps": main["offered_rps"],
            "rounds": per_round,
            "idle_s": idle_s,
            "memory": memory,
        },
        "defects": defects,
        "findings": findings,
    }


# 0. The transport floor ------------------------------------------------------------------------------------


async def transport_floor(ctx: Context) -> dict[str, Any]:
    """Empty grpc.aio servers wired as the mesh is (bench.floor): what the hops alone cost on this machine, with
    the internal hops as unary calls and as hop-stream messages (the mesh's default)."""
    from bench.floor import METHOD, FloorMesh

    runs: list[dict[str, Any]] = []
    payload = bytes(120)  # about the size of a one-row `fraud` request
    for streams, suffix in ((0, ""), (2, ", hop streams")):
        floor = await asyncio.to_thread(FloorMesh(streams=streams).start)
        try:
            paths = [("mesh topology" + suffix, floor.edge)]
            if not streams:
                paths.insert(0, ("one hop", floor.leaf))
            for series, address in paths:
                async with grpc.aio.insecure_channel(address) as channel:
                    call = channel.unary_unary(METHOD)

                    async def send(i: int, call=call) -> None:
                        await call(payload, timeout=10)

                    for concurrency in ctx.options.concurrency:
                        recording = await ctx.closed(send, concurrency, f"floor · {series} · c={concurrency}")
                        runs.append(_run(recording, series))
        finally:
            await asyncio.to_thread(floor.stop)
    rows = [
        {"series": r["series"], "concurrency": r["concurrency"], **_point(r)} for r in runs if r["mode"] == "closed"
    ]
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": {"rows": rows},
        "defects": [f"failed requests without any fault: {unexpected}"] if unexpected else [],
    }


# 8. Fair share between tenants --------------------------------------------------------------------------


def _per_request_ms(cpu_s: float, count: int) -> float | None:
    return round(1000 * cpu_s / count, 3) if count else None


def _refusals(samples: list[Sample], code: str = "RESOURCE_EXHAUSTED") -> dict[str, Any]:
    """How fast requests were refused with `code`: latency from the actual send (an open loop's generator
    lag is its own, not the gateway's), nearest rank."""
    latencies = sorted((s.end - (s.sent if s.sent is not None else s.start)) * 1000 for s in samples if s.code == code)
    return {
        "count": len(latencies),
        "p50_ms": _r(nearest_rank(latencies, 50)),
        "p99_ms": _r(nearest_rank(latencies, 99)),
        "max_ms": _r(latencies[-1]) if latencies else None,
    }


def _admission_span_s(samples: list[Sample]) -> float:
    """The longest the gateway can have been admitting a run's requests: from the first send to the last
    answer (each request is admitted between its send and its answer)."""
    if not samples:
        return 0.0
    first = min(s.sent if s.sent is not None else s.start for s in samples)
    return max(s.end for s in samples) - first


def _quota_allows(quota: dict[str, float], seconds: float) -> float:
    """The most requests a token bucket quota admits in `seconds` (a full bucket to start with)."""
    rate = quota.get("rate_per_s")
    if rate is None:
        return math.inf
    return float(quota.get("burst") or max(1, math.ceil(rate))) + rate * seconds


def _flood_point(run: dict[str, Any], recording: Recording, quota: dict[str, float]) -> dict[str, Any]:
    """The figures of one flood run: what was accepted (against what the quota allows over the whole run,
    warm-up included) and how fast the rest was refused."""
    refused = _refusals(recording.measured())
    run_s = _admission_span_s(recording.samples)
    return {
        "offered_rps": run["offered_rps"],
        "requests": run["requests"],
        "accepted": run["ok"],
        "accepted_rps": run["throughput_rps"],
        "accepted_p99_ms": run["latency_from_send_ms"]["p99"],
        "refused": refused["count"],
        "refused_p50_ms": refused["p50_ms"],
        "refused_p99_ms": refused["p99_ms"],
        "refused_max_ms": refused["max_ms"],
        "other_errors": {code: n for code, n in run["errors"].items() if code != "RESOURCE_EXHAUSTED"},
        "accepted_whole_run": sum(1 for s in recording.samples if s.code == OK),
        "quota_allows_whole_run": round(_quota_allows(quota, run_s), 1),
        "run_s": round(run_s, 3),
        "generator_lag_p99_ms": run["send_lag_ms_p99"],
    }


async def tenants(ctx: Context) -> dict[str, Any]:
    """Tenant "calm" (no quota) at a steady closed loop, alone and then while tenant "flood" sends
    `flood_factor` x its rate quota (open loop); then the flood alone, for the refusals' own latency on an
    otherwise idle mesh. Calm's latency with and without the flood, none of its requests refused, the flood's
    excess refused at once with a retry hint."""
    mesh = await ctx.mesh()
    options = ctx.options
    quota = mesh.options.tenants.get(env.FLOOD_TENANT) or {}
    if quota.get("rate_per_s") is None:
        raise RuntimeError(f"the mesh's key file gives tenant '{env.FLOOD_TENANT}' no rate quota")
    rate = quota["rate_per_s"] * options.flood_factor
    concurrency = options.calm_concurrency
    assert mesh.gateway is not None and mesh.gateway.process is not None
    gateway_pid = mesh.gateway.process.pid
    gateway_cpu_s: list[float] = []  # per phase, warm-up included

    async def phase(*loads: Awaitable[Recording]) -> list[Recording]:
        before = env.cpu_seconds(gateway_pid)
        recordings = await asyncio.gather(*loads)
        gateway_cpu_s.append(env.cpu_seconds(gateway_pid) - before)
        return list(recordings)

    async with _client(mesh.gateway_address) as client, grpc.aio.insecure_channel(mesh.gateway_address) as channel:
        calm = FraudViaGateway(client, ctx.tenant_keys["calm"], seed=21)
        flood = FraudViaGatewayRaw(channel, ctx.tenant_keys[env.FLOOD_TENANT], seed=22)
        [alone] = await phase(ctx.closed(calm, concurrency, f"tenants · calm alone · c={concurrency}"))
        with_flood, flooding = await phase(
            ctx.closed(calm, concurrency, f"tenants · calm with the flood · c={concurrency}"),
            ctx.open(flood, rate, f"tenants · flood beside calm · {rate:.0f} req/s Poisson", seed=22),
        )
        [flood_alone] = await phase(ctx.open(flood, rate, f"tenants · flood alone · {rate:.0f} req/s Poisson", seed=23))
    # Gateway CPU per request the gateway saw in each phase (every request of the phase, warm-up included).
    sent = [len(alone.samples), len(with_flood.samples) + len(flooding.samples), len(flood_alone.samples)]
    gateway_cpu_ms = {
        name: _per_request_ms(cpu, count)
        for name, cpu, count in zip(
            ("calm alone", "calm with the flood", "flood alone"), gateway_cpu_s, sent, strict=True
        )
    }
    runs = [
        _run(alone, "calm alone"),
        _run(with_flood, "calm with the flood"),
        _run(flooding, "flood beside calm"),
        _run(flood_alone, "flood alone"),
    ]
    calm_phases = {run["series"]: {"requests": run["requests"], **_point(run)} for run in runs[:2]}
    floods = {
        "beside calm": _flood_point(runs[2], flooding, quota),
        "alone": _flood_point(runs[3], flood_alone, quota),
    }
    hints = sorted(flood.retry_hints_s)
    retry_hints = {
        "refusals": flood.refused,
        "with_hint": len(hints),
        "range_ms": [round(hints[0] * 1000, 3), round(hints[-1] * 1000, 3)] if hints else None,
    }
    alone_p99 = calm_phases["calm alone"]["p99_ms"]
    flood_p99 = calm_phases["calm with the flood"]["p99_ms"]
    defects = []
    findings = []
    unexpected = _unexpected_errors(runs[:2])
    if unexpected:
        defects.append(f"tenants: tenant calm (no quota) had requests fail while another tenant flooded: {unexpected}")
    for phase, point in floods.items():
        run = runs[2] if phase == "beside calm" else runs[3]
        if point["other_errors"]:
            examples = {code: run.get("error_examples", {}).get(code) for code in point["other_errors"]}
            # CANCELLED: refused by gRPC core's bound on calls the gateway's event loop has not picked up yet.
            defects.append(
                f"tenants: the flood's excess ({phase}) ended {point['other_errors']} instead of RESOURCE_EXHAUSTED "
                f"from its quota (messages {examples})"
            )
        if point["accepted_whole_run"] > point["quota_allows_whole_run"] + 1:
            defects.append(
                f"tenants: tenant flood ({phase}) got {point['accepted_whole_run']} requests answered in "
                f"{point['run_s']:g} s, more than its quota {quota} allows ({point['quota_allows_whole_run']:.0f})"
            )
    if flood.refused and len(hints) < flood.refused:
        defects.append(
            f"tenants: {flood.refused - len(hints)} of {flood.refused} refusals of tenant flood carried no "
            "google.rpc.RetryInfo retry hint"
        )
    beside, by_itself = floods["beside calm"], floods["alone"]
    if beside["refused_p99_ms"] is not None and beside["refused_p99_ms"] > 5:
        findings.append(
            f"tenants: the flood's refusals took p99 {beside['refused_p99_ms']:.1f} ms from their send (target "
            f"< 5 ms) while calm ran at c={concurrency} on the same cores; "
            f"p99 {by_itself['refused_p99_ms'] or math.nan:.1f} ms with the flood alone"
        )
    if _sub(flood_p99, alone_p99) is not None and flood_p99 > 2 * alone_p99 and flood_p99 - alone_p99 > 5:
        findings.append(
            f"tenants: a flood refused at the gateway still raised calm's p99 from {alone_p99:.1f} to "
            f"{flood_p99:.1f} ms (the refusals and the load generator share the cores with the mesh)"
        )
    return {
        "runs": runs,
        "summary": {
            "quota": quota,
            "calm_concurrency": concurrency,
            "flood_rate_rps": round(rate, 1),
            "flood_factor": options.flood_factor,
            "calm": calm_phases,
            "calm_p99_ratio": round(flood_p99 / alone_p99, 2) if alone_p99 and not math.isnan(flood_p99) else None,
            "flood": floods,
            "retry_hints": retry_hints,
            "gateway_cpu_per_request_ms": gateway_cpu_ms,
        },
        "timelines": {
            run["series"]: timeline(recording)
            for run, recording in zip(runs, (alone, with_flood, flooding), strict=False)
        },
        "defects": defects,
        "findings": findings,
    }


# 9. Cost of rejecting malformed requests ---------------------------------------------------------------

MALFORMED_CPU_BUDGET_MS = 5.0  # the project's guide: a 16 MiB malformed request costs < 5 ms of gateway CPU
CLIENT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
POOL_SETTLING_BUFFERS = 6  # growth of the gateway's VmRSS after the first kind, in max messages, short of a leak


async def malformed(ctx: Context) -> dict[str, Any]:
    """Requests of just under the gateway's max message, each malformed so that the gateway must refuse it
    with INVALID_ARGUMENT, one at a time with the mesh otherwise idle: the status seen, client latency and the
    gateway's CPU per rejection (from /proc, less an idle baseline over the same wall time)."""
    mesh = await ctx.mesh()
    assert mesh.gateway is not None and mesh.gateway.process is not None
    count = ctx.options.malformed_requests
    max_message = int(
        mesh.options.gateway.get("max_message_bytes", GatewaySettings.model_fields["max_message_bytes"].default)
    )
    pid = mesh.gateway.process.pid
    requests = await asyncio.to_thread(malformed_requests, max_message)
    metadata = (("authorization", f"Bearer {ctx.api_key}"),)
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    rss_before = env.memory_mib(pid)
    rss_by_kind: list[float] = []  # the gateway's VmRSS after each kind's requests
    rows = []
    channel_options = [
        ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(mesh.gateway_address, options=channel_options) as channel:
        call = channel.unary_unary(MODEL_INFER)

        async def send(payload: bytes) -> tuple[str, str]:
            try:
                await call(payload, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                return error.code().name, (error.details() or "")[:200]
            return OK, ""

        for request in requests:
            ctx.log(f"malformed: {count} x {request.kind} ({len(request.payload) / 2**20:.2f} MiB)")
            await send(request.payload)  # warm-up, discarded
            codes: dict[str, int] = {}
            examples: dict[str, str] = {}
            latencies = []
            user_before, system_before = env.cpu_times(pid)
            started = time.perf_counter()
            for _ in range(count):
                sent = time.perf_counter()
                code, message = await send(request.payload)
                latencies.append((time.perf_counter() - sent) * 1000)
                codes[code] = codes.get(code, 0) + 1
                examples.setdefault(code, message)
            wall = time.perf_counter() - started
            user_after, system_after = env.cpu_times(pid)
            user, system = user_after - user_before, system_after - system_before
            rss_by_kind.append(env.memory_mib(pid).get("VmRSS") or 0.0)
            busy = user + system
            idle_before = env.cpu_seconds(pid)
            await asyncio.sleep(wall)  # the same wall time with no requests: what the gateway spends anyway
            idle = env.cpu_seconds(pid) - idle_before
            latencies.sort()
            rows.append(
                {
                    "kind": request.kind,
                    "what": request.what,
                    "bytes": len(request.payload),
                    "requests": count,
                    "codes": dict(sorted(codes.items())),
                    "messages": examples,
                    "p50_ms": _r(nearest_rank(latencies, 50)),
                    "p99_ms": _r(nearest_rank(latencies, 99)),
                    "wall_s": round(wall, 3),
                    "gateway_cpu_ms": round(1000 * busy, 1),
                    "idle_cpu_ms": round(1000 * idle, 1),
                    "cpu_per_rejection_ms": _per_request_ms(busy - idle, count),
                    "cpu_per_rejection_gross_ms": _per_request_ms(busy, count),
                    "user_per_rejection_ms": _per_request_ms(user, count),
                    "system_per_rejection_ms": _per_request_ms(system, count),
                    "idle_per_request_ms": _per_request_ms(idle, count),
                }
            )
    rss_after = env.memory_mib(pid)
    defects = []
    for row in rows:
        wrong = {code: n for code, n in row["codes"].items() if code != "INVALID_ARGUMENT"}
        if wrong:
            messages = {code: row["messages"].get(code) for code in wrong}
            defects.append(
                f"malformed/{row['kind']}: {sum(wrong.values())} of {row['requests']} requests "
                f"({row['bytes']:,} bytes, {row['what']}) answered {wrong} instead of INVALID_ARGUMENT "
                f"(messages {messages})"
            )
        big = not row["kind"].startswith("reference")
        cost = row["cpu_per_rejection_ms"]
        if big and cost is not None and cost > MALFORMED_CPU_BUDGET_MS:
            defects.append(
                f"malformed/{row['kind']}: rejecting a {row['bytes'] / 2**20:.1f} MiB request ({row['what']}) cost "
                f"{cost:.2f} ms of gateway CPU ({row['gateway_cpu_ms']:.0f} ms over {row['requests']} requests, "
                f"{row['idle_cpu_ms']:.0f} ms idle over the same {row['wall_s']:.2f} s), over the "
                f"{MALFORMED_CPU_BUDGET_MS:g} ms budget"
            )
    # The gateway keeps freed message buffers for the next message (infermesh/heap.py): the first kind's requests
    # fill that pool, and a leak shows as growth after it. The pool settles over a few more buffers than the first
    # kind needed (gRPC receives on several threads, each with its own malloc arena; measured: +57 MiB over the
    # 160 refusals after the first kind's 20, then +3 MiB over 240 more), while a leak of even one refused request
    # in eight grows past POOL_SETTLING_BUFFERS within the default 150 requests after the first kind.
    grown = rss_by_kind[-1] - rss_by_kind[0] if rss_by_kind else 0.0
    if grown > POOL_SETTLING_BUFFERS * max_message / 2**20:
        defects.append(
            f"malformed: the gateway's VmRSS grew from {rss_by_kind[0]} to {rss_by_kind[-1]} MiB over "
            f"{count * (len(requests) - 1)} refused requests after the first {count} (sent one at a time): the "
            "memory of requests it refused is not given back when they end"
        )
    if not mesh.gateway.alive:
        defects.append("malformed: the gateway exited during the malformed requests")
    return {
        "runs": [],
        "summary": {
            "requests_per_kind": count,
            "max_message_bytes": max_message,
            "cpu_resolution_ms": round(tick_ms / count, 3) if count else None,
            "budget_ms": MALFORMED_CPU_BUDGET_MS,
            "rows": rows,
            "gateway_rss_mib": {"before": rss_before.get("VmRSS"), "after": rss_after.get("VmRSS")},
            "gateway_rss_by_kind_mib": rss_by_kind,
            "gateway_vmhwm_mib": {"before": rss_before.get("VmHWM"), "after": rss_after.get("VmHWM")},
        },
        "defects": defects,
    }


# 10. Soak ------------------------------------------------------------------------------------------------


async def soak(ctx: Context) -> dict[str, Any]:
    """`fraud` through the gateway at soak_concurrency for soak_s: throughput and each process's RSS over time
    (flat within 10 % between the first and the last sample is the target)."""
    mesh = await ctx.mesh()
    options = ctx.options
    pids = env.mesh_pids(mesh)
    samples: list[dict[str, Any]] = []
    interval_s = max(0.5, options.soak_s / 30)

    async def sample(stop: asyncio.Event) -> None:
        started = time.monotonic()
        while not stop.is_set():
            rss = {name: env.memory_mib(pid).get("VmRSS") for name, pid in pids.items()}
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": rss})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    async with _client(mesh.gateway_address) as client:
        send = FraudViaGateway(client, ctx.api_key, seed=8)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        try:
            recording = await ctx.closed(
                send,
                options.soak_concurrency,
                f"soak · c={options.soak_concurrency} · {options.soak_s:g} s",
                duration_s=options.soak_s,
            )
        finally:
            stop.set()
            await sampler
    run = _run(recording, "soak")
    # Baseline: a sample once the load has ramped up (connections, pools and allocator arenas in use).
    settle_s = min(30.0, options.soak_s / 10)
    first = next((x for x in samples if x["t_s"] >= settle_s), samples[0])["rss_mib"]
    last = samples[-1]["rss_mib"]
    growth = {name: round(100 * (last[name] - first[name]) / first[name], 1) for name in pids if first[name]}
    defects = [f"{name} RSS grew {g:.1f} % over the soak" for name, g in growth.items() if g > 10]
    unexpected = _unexpected_errors([run])
    if unexpected:
        defects.append(f"failed requests without any fault: {unexpected}")
    return {
        "runs": [run],
        "summary": {
            "point": _point(run),
            "settle_s": settle_s,
            "rss_first_mib": first,
            "rss_last_mib": last,
            "growth_pct": growth,
        },
        "samples": samples,
        "defects": defects,
    }


# 11. Model changes under load --------------------------------------------------------------------------------


async def model_changes(ctx: Context) -> dict[str, Any]:
    """`fraud` through the gateway at c=16 while its versions change (Triton's repository API, admin key): version 2
    in and 1 out (a config override with policy latest 1), back to version 1, both versions, and back to the
    folder's config (version 1 only). Zero failed requests is the requirement."""
    options = ctx.options
    duration = options.fault_duration_s
    concurrency = options.model_change_concurrency
    clock = _Timed()
    changes: list[dict[str, Any]] = []
    async with ctx.dedicated_mesh("model-changes") as mesh:
        folder = mesh.repository / "fraud"
        config = json.loads((folder / "config.json").read_text())
        admin = {"authorization": f"Bearer {ctx.api_key}"}
        steps = [
            ("config: version 2 in, 1 out", {**config, "version_policy": {"latest": {"num_versions": 1}}}),
            ("config: version 1 only", {**config, "version_policy": {"specific": {"versions": [1]}}}),
            ("config: versions 1 and 2", {**config, "version_policy": {"all": {}}}),
            ("load: the folder's config (1 only)", None),
        ]

        async def script(client: aioclient.InferenceServerClient) -> None:
            for index, (what, override) in enumerate(steps):
                await clock.at(duration * (0.15 + 0.2 * index))
                started = clock.mark(what)
                text = json.dumps(override) if override is not None else ""
                await client.load_model("fraud", config=text or None, headers=admin)
                changes.append(
                    {"what": what, "at_s": round(started, 3), "load_s": round(clock.runs[0].now() - started, 3)}
                )
                ctx.log(f"model changes: {what} at t={started:.2f}s took {changes[-1]['load_s']:.2f}s")

        async with _client(mesh.gateway_address) as client, _client(mesh.gateway_address) as admin_client:
            send = FraudViaGateway(client, ctx.api_key)
            changing = asyncio.create_task(script(admin_client))
            recording = await ctx.closed(
                send, concurrency, f"model changes · c={concurrency}", duration_s=duration, started=clock.started
            )
            await changing
    samples = recording.measured()
    total = summarize(samples, (0.0, duration))
    first_change = changes[0]["at_s"] if changes else duration
    before = summarize([s for s in samples if s.end < first_change], (0.0, first_change))
    during = summarize([s for s in samples if s.start >= first_change], (first_change, duration))
    failed = sum(total["errors"].values())
    defects = []
    if failed:
        defects.append(f"model changes: {failed} of {total['requests']} requests failed {total['errors']}")
    return {
        "runs": [_run(recording, "gateway while models change")],
        "summary": {
            "concurrency": concurrency,
            "changes": changes,
            "requests": total["requests"],
            "failed": failed,
            "errors": total["errors"],
            "before": {"p50_ms": _r(before["latency_ms"]["p50"]), "p99_ms": _r(before["latency_ms"]["p99"])},
            "during": {"p50_ms": _r(during["latency_ms"]["p50"]), "p99_ms": _r(during["latency_ms"]["p99"])},
        },
        "timelines": {"gateway while models change": timeline(recording)},
        "defects": defects,
    }


# 12. Redis stall -----------------------------------------------------------------------------------------------


async def feature_store_stall(ctx: Context) -> dict[str, Any]:
    """Redis stops answering for `stall_s` (CLIENT PAUSE ALL: connections stay open, nothing answers) under load:
    `fraud` (on_missing=default) must keep answering within its feature budget (the target: no failure, p99 of the
    requests sent during the stall ≤ 150 ms); `fraud_strict` (reject) fails fast."""
    mesh = await ctx.mesh()
    options = ctx.options
    duration = max(options.fault_duration_s, options.stall_s * 3)
    clock = _Timed()
    times: dict[str, float] = {}
    per_policy = max(1, options.fault_concurrency // 2)

    async def script() -> None:
        await clock.at(duration * 0.3)
        admin = redis.Redis.from_url(mesh.redis_url)
        try:
            await asyncio.to_thread(admin.execute_command, "CLIENT", "PAUSE", int(options.stall_s * 1000), "ALL")
        finally:
            admin.close()
        times["pause"] = clock.mark(f"CLIENT PAUSE {options.stall_s:g} s")
        times["resume"] = times["pause"] + options.stall_s
        ctx.log(f"stall: redis paused at t={times['pause']:.2f}s for {options.stall_s:g}s")

    async with _client(mesh.gateway_address) as client:
        loads = {
            "default": FraudViaGateway(client, ctx.api_key, "fraud", seed=3),
            "reject": FraudViaGateway(client, ctx.api_key, "fraud_strict", seed=4),
        }
        fault = asyncio.create_task(script())
        recordings = await asyncio.gather(
            *(
                ctx.closed(
                    send, per_policy, f"stall · {policy} · c={per_policy}", duration_s=duration, started=clock.started
                )
                for policy, send in loads.items()
            )
        )
        await fault
    policies: dict[str, Any] = {}
    runs, timelines, defects = [], {}, []
    for policy, recording in zip(loads, recordings, strict=True):
        offset = recording.origin - clock.runs[0].origin
        pause, resume = times["pause"] - offset, times["resume"] - offset
        samples = recording.measured()
        split = _phases(samples, pause, resume, duration)
        phases = {
            "before": _phase(split["before"], 0.0, pause),
            "stall": _phase(split["during"], pause, resume),
            "after": _phase(split["after"], resume, duration),
        }
        policies[policy] = {
            "model": loads[policy].model,
            "phases": {name: _phase_point(phase) for name, phase in phases.items()},
        }
        runs.append(_run(recording, f"stall · policy {policy}"))
        timelines[f"stall · policy {policy}"] = timeline(recording)
    stall = policies["default"]["phases"]["stall"]
    if stall["errors"]:
        defects.append(f"stall/default: {sum(stall['errors'].values())} requests failed {stall['errors']}")
    if stall["p99_ms"] is not None and stall["p99_ms"] > options.stall_p99_budget_ms:
        defects.append(
            f"stall/default: p99 of the requests during the stall {stall['p99_ms']} ms "
            f"(budget {options.stall_p99_budget_ms:g} ms)"
        )
    after = policies["default"]["phases"]["after"]
    if after["errors"]:
        defects.append(f"stall/default: {after['errors']} failed after Redis answered again")
    return {
        "runs": runs,
        "summary": {
            "concurrency_per_policy": per_policy,
            "stall_s": options.stall_s,
            "p99_budget_ms": options.stall_p99_budget_ms,
            "events_s": {k: round(v, 3) for k, v in times.items()},
            "policies": policies,
        },
        "timelines": timelines,
        "defects": defects,
    }


# 13. Cost of the rollout machinery ------------------------------------------------------------------------------


# The baseline: neither a traffic section nor the demo config's monitoring (prediction log, drift windows), so
# that "everything" below is measured against none of it.
ROLLOUT_BARE = "none: no traffic section, no monitoring"
ROLLOUT_SETUPS: tuple[tuple[str, dict[str, Any] | None], ...] = (
    (ROLLOUT_BARE, None),
    ("monitoring only: prediction log (every request) and drift windows", None),
    ("shadow: every batch mirrored to version 2", {"baseline": "1", "shadow": ["2"]}),
    (
        "guarded canary: 90/10, 10 % of the canary compared",
        # Limits no healthy version breaks: the guard measures and compares, it must not roll back here.
        {"baseline": "1", "split": {"1": 90, "2": 10}, "guard": {"min_requests": 50, "max_error_ratio": 0.5}},
    ),
    (
        "everything: monitoring, canary 90/10 guarded, shadow of version 2 on the baseline",
        {
            "baseline": "1",
            "split": {"1": 90, "3": 10},
            "shadow": ["2"],
            "guard": {"min_requests": 50, "max_error_ratio": 0.5},
        },
    ),
)


async def rollouts(ctx: Context) -> dict[str, Any]:
    """`fraud` through the gateway at the sweep's lowest and highest concurrency (at most 64): with none of the
    machinery, with the demo's monitoring (prediction log, drift windows), then with a shadow, a guarded canary and
    both on top: what it costs on the request path (the mirrors themselves take cores on this machine too)."""
    mesh = await ctx.mesh()
    options = ctx.options
    admin = {"authorization": f"Bearer {ctx.api_key}"}
    config = json.loads((mesh.repository / "fraud" / "config.json").read_text())
    bare = {key: value for key, value in config.items() if key != "monitoring"}
    concurrencies = sorted({min(options.concurrency), max(c for c in options.concurrency if c <= 64)})
    runs: list[dict[str, Any]] = []
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    # Two rounds, the second in reverse order, each setup's better figures kept: other work on the machine
    # shifts a run's figures by more than what is measured here.
    order = [*ROLLOUT_SETUPS, *reversed(ROLLOUT_SETUPS)] if not options.quick else list(ROLLOUT_SETUPS)
    async with _client(mesh.gateway_address) as client:
        send = FraudViaGateway(client, ctx.api_key)
        try:
            for what, traffic in order:
                if what == ROLLOUT_BARE:
                    await client.load_model("fraud", config=json.dumps(bare), headers=admin)
                elif traffic is None:
                    await client.load_model("fraud", headers=admin)  # the folder's config: no traffic section
                else:
                    versions = sorted({traffic["baseline"], *traffic.get("split", {}), *traffic.get("shadow", [])})
                    override = {**config, "traffic": traffic}
                    if "3" in versions:  # the demo has versions 1 and 2: a copy of 2 stands in as another canary
                        await asyncio.to_thread(_ensure_version_copy, mesh.repository / "fraud", "2", "3")
                    await client.load_model("fraud", config=json.dumps(override), headers=admin)
                for concurrency in concurrencies:
                    pids = env.mesh_pids(mesh)
                    cpu_before = {name: env.cpu_seconds(pid) for name, pid in pids.items()}
                    recording = await ctx.closed(send, concurrency, f"rollouts · {what} · c={concurrency}")
                    cpu_s = {name: env.cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
                    run = _run(recording, what)
                    runs.append(run)
                    # CPU of every mesh process per request (warm-up included on both sides), and the same in
                    # units of the gateway's CPU of this run: the gateway's work per request is the same in every
                    # setup, so that ratio keeps this machine's changes of speed between runs out of the figure.
                    cpu_ms = _per_request_ms(sum(cpu_s.values()), len(recording.samples))
                    gateway_s = cpu_s.get("gateway", 0.0)
                    in_gateway_units = round(sum(cpu_s.values()) / gateway_s, 3) if gateway_s > 0 else None
                    point = {
                        "setup": what,
                        "concurrency": concurrency,
                        "cpu_ms": cpu_ms,
                        "cpu_in_gateway_units": in_gateway_units,
                        **_point(run),
                    }
                    measured.setdefault((what, concurrency), []).append(point)
        finally:
            await client.load_model("fraud", headers=admin)
    rows: list[dict[str, Any]] = []
    for points in measured.values():
        best = max(points, key=lambda p: p["throughput_rps"])
        cpus = [p["cpu_ms"] for p in points if p["cpu_ms"] is not None]
        units = [p["cpu_in_gateway_units"] for p in points if p["cpu_in_gateway_units"] is not None]
        rows.append(
            {
                **best,
                "cpu_ms": min(cpus) if cpus else None,
                "cpu_in_gateway_units": round(statistics.median(units), 3) if units else None,
                "rounds": len(points),
            }
        )
    base = {r["concurrency"]: r for r in rows if r["setup"] == ROLLOUT_BARE}
    for row in rows:
        first = base[row["concurrency"]]
        row["throughput_vs_none"] = _ratio(row["throughput_rps"], first["throughput_rps"])
        units, first_units = row["cpu_in_gateway_units"], first["cpu_in_gateway_units"]
        row["cpu_vs_none"] = _ratio(units, first_units) if units and first_units else None
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": {"rows": rows, "concurrency": concurrencies},
        "defects": [f"failed requests while rolling out: {unexpected}"] if unexpected else [],
    }


def _ensure_version_copy(folder: Path, source: str, target: str) -> None:
    if not (folder / target).exists():
        staging = folder / f".staging-{target}"
        shutil.copytree(folder / source, staging)
        pin_version(folder, target, file_sha256(staging / MODEL_FILE))  # the model service serves pinned weights
        staging.rename(folder / target)


# 14. Priority mix -----------------------------------------------------------------------------------------------


async def priority_mix(ctx: Context) -> dict[str, Any]:
    """`fraud` through the gateway past the model's capacity (a dedicated mesh whose model services take
    `priority_model_delay_ms` more per batch, so that the queues form at the router and the model services
    rather than in the gateway's CPU): a few clients sending Triton priority 1 (the highest) among many at the
    default level, and the same mix all at the default level for comparison."""
    options = ctx.options
    high_c, default_c = options.priority_concurrency
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    slow_model = {"inject_delay_ms": options.priority_model_delay_ms}
    async with (
        ctx.dedicated_mesh("priorities", model_service=slow_model) as mesh,
        _client(mesh.gateway_address) as client,
    ):
        # Small batches: a queue longer than one batch is what a priority reorders.
        config = json.loads((mesh.repository / "fraud" / "config.json").read_text())
        config["max_batch_size"] = options.priority_max_batch
        admin = {"authorization": f"Bearer {ctx.api_key}"}
        await client.load_model("fraud", config=json.dumps(config), headers=admin)
        for mix, high_priority in (("all at the default level", 0), ("priority 1 among default", 1)):
            loads = {
                "high": FraudViaGateway(client, ctx.api_key, seed=5, priority=high_priority),
                "default": FraudViaGateway(client, ctx.api_key, seed=6),
            }
            recordings = await asyncio.gather(
                ctx.closed(loads["high"], high_c, f"priorities · {mix} · high c={high_c}"),
                ctx.closed(loads["default"], default_c, f"priorities · {mix} · default c={default_c}"),
            )
            for (group, _), recording in zip(loads.items(), recordings, strict=True):
                run = _run(recording, f"{mix} · {group}")
                runs.append(run)
                rows.append({"mix": mix, "group": group, "concurrency": recording.concurrency, **_point(run)})
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": {
            "rows": rows,
            "model_delay_ms": options.priority_model_delay_ms,
            "max_batch_size": options.priority_max_batch,
        },
        "defects": [f"failed requests in the priority mix: {unexpected}"] if unexpected else [],
    }


Scenario = Callable[[Context], Awaitable[dict[str, Any]]]
# 15. The HTTP/REST front -----------------------------------------------------------------------------------


async def http_front(ctx: Context) -> dict[str, Any]:
    """`fraud` through the gateway over gRPC (tritonclient) and over HTTP/REST (aiohttp; JSON tensors, and
    Triton's binary tensor extension), closed loops at each concurrency: what each public protocol costs."""
    mesh = await ctx.mesh()
    assert mesh.gateway is not None and mesh.gateway.http_port > 0, "the gateway serves HTTP/REST"
    base_url = f"http://127.0.0.1:{mesh.gateway.http_port}"
    options = ctx.options
    runs: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=max(options.concurrency))
    async with _client(mesh.gateway_address) as client, aiohttp.ClientSession(connector=connector) as session:
        sends = {
            "gRPC": FraudViaGateway(client, ctx.api_key),
            "HTTP/REST, JSON": FraudViaHttp(session, base_url, ctx.api_key),
            "HTTP/REST, binary tensors": FraudViaHttp(session, base_url, ctx.api_key, binary=True),
        }
        for concurrency in options.concurrency:
            for series, send in sends.items():
                recording = await ctx.closed(send, concurrency, f"http · {series} · c={concurrency}")
                runs.append(_run(recording, series))
    rows = [{"series": r["series"], "concurrency": r["concurrency"], **_point(r)} for r in runs]
    unexpected = _unexpected_errors(runs)
    return {
        "runs": runs,
        "summary": {"rows": rows},
        "defects": [f"failed requests without any fault: {unexpected}"] if unexpected else [],
    }


SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "floor": ("0. Transport floor", transport_floor),
    "overhead": ("1. Mesh overhead", mesh_overhead),
    "features": ("2. Feature fetch alone", feature_fetch),
    "batching": ("3. Dynamic batching", dynamic_batching),
    "failover": ("4. Failover", failover),
    "outage": ("5. Feature store outage", feature_store_outage),
    "slow": ("6. Slow replica", slow_replica),
    "overload": ("7. Overload", overload),
    "tenants": ("8. Fair share between tenants", tenants),
    "malformed": ("9. Cost of rejecting malformed requests", malformed),
    "soak": ("10. Soak", soak),
    "models": ("11. Model changes under load", model_changes),
    "stall": ("12. Redis stall", feature_store_stall),
    "rollouts": ("13. Cost of shadowing and guarding", rollouts),
    "priorities": ("14. Priority mix", priority_mix),
    "http": ("15. HTTP/REST front", http_front),
}


async def run_scenario(ctx: Context, name: str) -> dict[str, Any]:
    title, scenario = SCENARIOS[name]
    started = time.perf_counter()
    outcome = await scenario(ctx)
    return {"name": name, "title": title, "seconds": round(time.perf_counter() - started, 1), **outcome}


__all__ = ["SCENARIOS", "BenchOptions", "Context", "run_scenario"]
