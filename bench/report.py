"""Results of a bench run as JSON, a Markdown summary (BENCHMARKS.md) and a PNG of latency vs throughput."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SWEEPS = ("overhead", "features", "batching", "slow")


def _clean(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n")
    return path


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _errors(errors: dict[str, int] | None) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{count} {code}" for code, count in errors.items())


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows]
    return lines


# Per scenario ----------------------------------------------------------------------------------------------


def _overhead(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["load"],
            r["direct"]["p50_ms"],
            r["direct"]["p99_ms"],
            r["direct"]["throughput_rps"],
            r["gateway"]["p50_ms"],
            r["gateway"]["p99_ms"],
            r["gateway"]["throughput_rps"],
            r["added_p50_ms"],
            r["added_p99_ms"],
        ]
        for r in s["summary"]["rows"]
    ]
    header = ["load", "direct p50 ms", "direct p99 ms", "direct req/s", "gateway p50 ms", "gateway p99 ms"]
    header += ["gateway req/s", "added p50 ms", "added p99 ms"]
    return [
        "`fraud`, one transaction per request: (a) straight to one model service replica with the assembled",
        "FP32 [1, 13] tensor; (b) through the gateway with `user_id`/`merchant_id`/`amount` (auth, validation,",
        "router, feature fetch from Redis, join, model call). The open-loop row offers both paths the same",
        "Poisson rate (half the gateway path's best closed-loop throughput).",
        "",
        *_table(header, rows),
    ]


def _features(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["entities"],
            r["features"],
            f"c={r['concurrency_low']}",
            r["low"]["p50_ms"],
            r["low"]["p99_ms"],
            f"c={r['best_concurrency']}",
            r["best"]["throughput_rps"],
            r["best"]["p99_ms"],
            float(r["entities_per_s"]),
        ]
        for r in s["summary"]["rows"]
    ]
    header = ["entities", "features", "low load", "p50 ms", "p99 ms", "best at", "reads/s", "p99 ms", "entity rows/s"]
    return [
        "`BatchReadFeatures` straight to a feature service (one MGET per call), views of 10 and 50 FP32 features,",
        f"random entities out of {s['summary']['population']:,}.",
        "",
        *_table(header, rows),
    ]


def _batching(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    budget = summary["p99_budget_ms"]
    rows = []
    for mode, m in summary["modes"].items():
        at, within = m["at"], m["within_budget"] or {}
        rows.append(
            [
                mode,
                at["throughput_rps"],
                at["p99_ms"],
                at["mean_batch_rows"],
                f"c={m['within_budget_concurrency']}" if m["within_budget_concurrency"] else "none",
                within.get("throughput_rps"),
                within.get("p99_ms"),
                within.get("mean_batch_rows"),
            ]
        )
    c = next(iter(summary["modes"].values()))["at_concurrency"]
    header = [
        "mode",
        f"req/s at c={c}",
        f"p99 ms at c={c}",
        "rows/batch",
        f"highest c with p99 ≤ {budget:g} ms",
        "req/s",
        "p99 ms",
        "rows/batch",
    ]
    on = summary["configs"]["batching on"]["dynamic_batching"]
    lines = [
        "`bench_mlp` (256 → 2048 → 2048 → 256, FP32, one torch thread) straight to one model service on "
        f"device `{summary['device']}`;",
        f"batching on = `max_batch_size` {summary['configs']['batching on']['max_batch_size']}, "
        f"`max_queue_delay_us` {on.get('max_queue_delay_us')}; off = `dynamic_batching.enabled: false`.",
        "",
        *_table(header, rows),
        "",
        f"Batching on vs off: {_f(summary.get('speedup_at_concurrency'))}x the throughput at c={c}",
    ]
    if "speedup_within_budget" in summary:
        lines[-1] += f", {_f(summary['speedup_within_budget'])}x within the same p99 budget of {budget:g} ms."
    else:
        lines[-1] += "."
    return lines


def _failover(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    events = summary["events_s"]
    rows = [
        [
            name,
            f"{p['from_s']:.1f}-{p['to_s']:.1f} s",
            p["requests"],
            _errors(p["errors"]),
            p["throughput_rps"],
            p["p50_ms"],
            p["p99_ms"],
        ]
        for name, p in summary["phases"].items()
    ]
    return [
        f"`fraud` through the gateway, closed loop c={summary['concurrency']}, two replicas. Replica 0 SIGKILLed at "
        f"t={events['kill']:.1f} s; "
        + (
            f"started again at t={events['restart']:.1f} s (ready at t={events['ready']:.1f} s)."
            if "restart" in events  # runs from before the supervisor restarted it
            else f"make run's supervisor started it again on its old ports (ready at t={events['ready']:.1f} s)."
        ),
        "",
        *_table(["phase", "window", "requests", "failed", "req/s", "p50 ms", "p99 ms"], rows),
        "",
        f"**Failed requests: {summary['failed']}** of {summary['requests']}. The restarted replica answered "
        f"{summary['restarted_replica_served']:.0f} model calls before the end of the run.",
    ]


def _outage(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    events = summary["events_s"]
    rows = []
    for policy, p in summary["policies"].items():
        for phase, f in p["phases"].items():
            flagged = f["tags"].get("features_unavailable", 0)
            defaulted = f["tags"].get("defaulted", 0)
            rows.append(
                [
                    f"{policy} (`{p['model']}`)",
                    phase,
                    f["requests"],
                    f["ok"],
                    f"{flagged} / {defaulted}",
                    _errors(f["errors"]),
                    f["p99_ms"],
                    f["failed_p99_ms"],
                ]
            )
    recovery = "; ".join(
        f"{policy}: {_f(p['recovery_s'])} s (first clean answer {_f(p['first_clean_after_s'])} s after)"
        for policy, p in summary["policies"].items()
    )
    header = ["policy", "phase", "requests", "ok", "flagged unavailable / defaulted", "errors", "p99 ok ms"]
    header += ["p99 failed ms"]
    return [
        f"`fraud` (on_missing `default`) and `fraud_strict` (`reject`) through the gateway side by side, closed loop "
        f"c={summary['concurrency_per_policy']} each. Redis saved, then SIGKILLed at t={events['kill']:.1f} s, started "
        f"again at t={events['restart']:.1f} s and answering at t={events['back']:.1f} s.",
        "",
        *_table(header, rows),
        "",
        f"Recovery (Redis answering → last failed or flagged answer): {recovery}. Until a probe finds Redis back, "
        f"the router's open circuit breaker keeps short-circuiting reads: it lets one through every "
        f"{_f(summary.get('breaker_open_s'))} s (`ROUTER_FEATURE_BREAKER_OPEN_S`).",
    ]


def _slow(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rows = []
    for r in summary["rows"]:
        unhedged = r.get("slow_unhedged")  # runs before hedging existed have none
        rows.append(
            [
                f"c={r['concurrency']}",
                r["healthy"]["p50_ms"],
                r["healthy"]["p99_ms"],
                r["healthy"]["throughput_rps"],
                r["slow"]["p50_ms"],
                r["slow"]["p99_ms"],
                r["slow"]["throughput_rps"],
                f"{100 * r['share_to_slow_replica']:.1f} %" if r["share_to_slow_replica"] is not None else "-",
                f"{_f(r.get('p99_vs_healthy'))}x",
                unhedged["p99_ms"] if unhedged else "-",
                f"{_f(r.get('p99_vs_healthy_unhedged'))}x" if unhedged else "-",
            ]
        )
    header = ["load", "healthy p50 ms", "healthy p99 ms", "healthy req/s", "slow p50 ms", "slow p99 ms"]
    header += ["slow req/s", "model calls to slow replica", "slow p99 / healthy", "no hedging: slow p99 ms"]
    header += ["no hedging: p99 / healthy"]
    return [
        f"`fraud` through the gateway; replica 1 given `MODEL_SERVICE_INJECT_DELAY_MS={summary['delay_ms']:g}` (every "
        "batch it runs takes that much longer) vs both replicas healthy. The router picks the cheaper of two "
        "random replicas, cost = peak-EWMA latency x (in-flight calls + 1), and hedges a model call still out after "
        "the recent p95 on the other replica (at most 5 % of calls); the last columns are the slow mesh with "
        "hedging off (`ROUTER_HEDGE_MAX_RATIO=0`). Target: slow p99 within 1.2x of healthy.",
        "",
        *_table(header, rows),
    ]


def _overload(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rounds = summary["rounds"]
    round_rows = [
        [
            str(r["round"]),
            r["offered_rps"],
            r["requests"],
            r["accepted_ok"],
            f"{r['shed']} ({r.get('shed_by_admission', r['shed'])} / {r.get('shed_by_grpc_backlog', 0)})",
            f"{100 * r['shed_fraction']:.1f} %" if r["shed_fraction"] is not None else "-",
            _errors(r["other_errors"]),
            r["accepted_throughput_rps"],
            r["accepted_p50_ms"],
            r["accepted_p99_ms"],
            r["accepted_p99_from_send_ms"],
            r["generator_lag_p99_ms"],
        ]
        for r in rounds
    ]
    memory_rows = [
        [
            name,
            m["idle_before_mib"],
            m["peak_sampled_mib"],
            " → ".join(_f(v, 1) for v in m["idle_after_rounds_mib"]),
            m["vmhwm_mib"],
        ]
        for name, m in summary["memory"].items()
    ]
    header = ["round", "offered req/s", "requests", "accepted"]
    header += ["shed (RESOURCE_EXHAUSTED admission / CANCELLED by gRPC's backlog bound)", "shed fraction"]
    header += ["other errors", "accepted req/s", "accepted p50 ms", "accepted p99 ms", "p99 from actual send ms"]
    header += ["generator lag p99 ms"]
    return [
        f"`fraud` through the gateway, open loop (Poisson) at {_f(summary['target_rps'])} req/s = "
        f"{summary['factor']:g} x the capacity measured just before ({_f(summary['capacity_rps'])} req/s, closed "
        f"loop c={summary['probe_concurrency']}), {len(rounds)} round(s) of {s['runs'][1]['duration_s']:g} s with "
        f"{summary['idle_s']:g} s idle after each. Latency counts from the scheduled arrival; the generator's lag "
        "(how late it sent, on the same 2 cores) is in the last column.",
        "",
        *_table(header, round_rows),
        "",
        "Resident memory (MiB) of each process from /proc/<pid>/status: VmRSS sampled every 0.25 s under load, "
        "VmRSS when idle after each round, and VmHWM (the peak over the process's life):",
        "",
        *_table(["process", "idle before", "peak under overload", "idle after each round", "VmHWM"], memory_rows),
    ]


def _floor(s: dict[str, Any]) -> list[str]:
    rows = [
        [r["series"], f"c={r['concurrency']}", r["throughput_rps"], r["p50_ms"], r["p99_ms"]]
        for r in s["summary"]["rows"]
    ]
    return [
        "Empty grpc.aio servers (uvloop, one process each, like the services) wired as the mesh is: client → edge",
        "→ hub → leaf, then hub → second leaf, in sequence (`bench/floor.py`); and one hop, client → leaf. No auth,",
        "validation, Redis or model: this is what the transport alone costs here, the floor under scenario 1.",
        "The internal hops both ways: one unary call each, and messages on hop streams (the mesh's default,",
        "`infermesh.hop_streams`); the client's hop to the edge is a unary call in both.",
        "",
        *_table(["path", "load", "req/s", "p50 ms", "p99 ms"], rows),
    ]


def _soak(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    point = summary["point"]
    first, last, growth = summary["rss_first_mib"], summary["rss_last_mib"], summary["growth_pct"]
    rows = [[name, first[name], last[name], f"{growth.get(name, 0):+.1f} %"] for name in first]
    run = s["runs"][0]
    return [
        f"`fraud` through the gateway at c={run['concurrency']} for {run['duration_s']:g} s: "
        f"{_f(point['throughput_rps'])} req/s, p50 {_f(point['p50_ms'])} ms, p99 {_f(point['p99_ms'])} ms, "
        f"{point['errors']} errors. Resident memory (VmRSS, MiB) of each process after {summary['settle_s']:g} s "
        "of load and at the end:",
        "",
        *_table(["process", "after ramp-up", "at the end", "change"], rows),
    ]


def _tenants(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    quota, calm, hints = summary["quota"], summary["calm"], summary["retry_hints"]
    calm_rows = [
        [phase, p["requests"], p["errors"], p["throughput_rps"], p["p50_ms"], p["p99_ms"]] for phase, p in calm.items()
    ]
    flood_rows = [
        [
            phase,
            f["offered_rps"],
            f["requests"],
            f"{f['accepted']} ({f['accepted_whole_run']} / {_f(f['quota_allows_whole_run'])})",
            f["accepted_rps"],
            f["refused"],
            _errors(f["other_errors"]),
            f["refused_p50_ms"],
            f["refused_p99_ms"],
            f["generator_lag_p99_ms"],
        ]
        for phase, f in summary["flood"].items()
    ]
    flood_header = ["flood", "offered req/s", "requests", "accepted (whole run / quota allows)", "accepted req/s"]
    flood_header += ["refused (RESOURCE_EXHAUSTED)", "other errors", "refused p50 ms", "refused p99 ms"]
    flood_header += ["generator lag p99 ms"]
    alone, with_flood = calm.get("calm alone", {}), calm.get("calm with the flood", {})
    failed = sum(p["errors"] for p in calm.values())
    span = hints["range_ms"]
    return [
        "`fraud` through the gateway from two tenants allowed it: **calm** (no quota), closed loop "
        f"c={summary['calm_concurrency']} (tritonclient), and **flood** (quota `rate_per_s` "
        f"{_f(quota.get('rate_per_s'), 0)}, `burst` {quota.get('burst')}, `max_inflight` {quota.get('max_inflight')}), "
        f"open loop (Poisson) at {_f(summary['flood_rate_rps'])} req/s = {summary['flood_factor']:g} x its rate, sent "
        "by a raw grpc.aio client of pre-serialized requests (the cheapest flood this machine can send). The quota "
        "is sized for this 2-core machine, where the mesh answers calm a few hundred req/s at c=8 (below): the "
        "flood is mostly refusals, which must cost the gateway too little to take the cores from calm. Phase A: "
        "calm alone; phase B: the same calm load with the flood beside it; then the flood alone, for what a "
        "refusal takes with the mesh otherwise idle. Refusal latency counts from the actual send.",
        "",
        *_table(["calm", "requests", "failed", "req/s", "p50 ms", "p99 ms"], calm_rows),
        "",
        *_table(flood_header, flood_rows),
        "",
        f"Calm's p99: {_f(alone.get('p99_ms'))} ms alone, {_f(with_flood.get('p99_ms'))} ms with the flood "
        f"({_f(summary['calm_p99_ratio'])}x); calm requests failed: {failed}. Refusals carrying a "
        f"google.rpc.RetryInfo hint: {hints['with_hint']} of {hints['refusals']}"
        + (f" (hints {_f(span[0])}-{_f(span[1])} ms)." if span else ".")
        + " Gateway CPU per request it saw in each phase (utime+stime from /proc, warm-up included): "
        + ", ".join(f"{phase} {_f(ms, 3)} ms" for phase, ms in summary.get("gateway_cpu_per_request_ms", {}).items())
        + ".",
    ]


def _malformed(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rows = [
        [
            r["kind"],
            r["what"],
            f"{r['bytes'] / 2**20:.2f} MiB" if r["bytes"] >= 2**20 else f"{r['bytes']:,} B",
            _errors(r["codes"]),
            r["p50_ms"],
            r["p99_ms"],
            r["cpu_per_rejection_ms"],
            f"{_f(r.get('user_per_rejection_ms'))} / {_f(r.get('system_per_rejection_ms'))}",
            r["idle_per_request_ms"],
        ]
        for r in summary["rows"]
    ]
    header = ["kind", "request", "size", "status seen", "client p50 ms", "client p99 ms"]
    header += ["gateway CPU per rejection ms", "user / system ms (before the baseline)"]
    header += ["idle baseline ms (per request's share)"]
    rss = summary["gateway_rss_mib"]
    return [
        f"With the mesh otherwise idle, {summary['requests_per_kind']} requests of each kind, one at a time, "
        "pre-serialized and sent by a raw grpc.aio call just under the gateway's max message "
        f"({summary['max_message_bytes'] / 2**20:g} MiB), each of which the gateway must refuse with "
        "INVALID_ARGUMENT (one more before each kind, discarded). Gateway CPU per rejection = (Δ utime+stime of "
        "the gateway process from /proc/<pid>/stat over the requests, less the same Δ over the same wall time "
        f"idle right after) / requests; resolution {_f(summary['cpu_resolution_ms'], 3)} ms per request "
        "(one clock tick over the count). The small request is a reference for the fixed cost of a refusal.",
        "",
        *_table(header, rows),
        "",
        f"Gateway VmRSS {_f(rss['before'], 1)} MiB before, {_f(rss['after'], 1)} MiB after"
        + (
            f" ({' / '.join(_f(v, 1) for v in summary['gateway_rss_by_kind_mib'])} MiB after each kind: freed "
            "message buffers are kept for the next message, so only growth after the first kind would be a leak)"
            if summary.get("gateway_rss_by_kind_mib")
            else ""
        )
        + f"; budget: < {summary['budget_ms']:g} ms of gateway CPU per 16 MiB malformed request.",
    ]


def _models(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rows = [[c["what"], f"{c['at_s']:.1f} s", f"{c['load_s']:.2f} s"] for c in summary["changes"]]
    before, during = summary["before"], summary["during"]
    return [
        f"`fraud` through the gateway, closed loop c={summary['concurrency']}, two replicas, while its versions "
        "change through Triton's repository API (`load_model`, admin key); each load returns once every replica "
        "serves the new versions and has retired the old ones (most of the 2 s is `MODEL_SERVICE_UNLOAD_GRACE_S`, "
        "during which a retired version still serves while the routers stop sending to it).",
        "",
        *_table(["change", "at", "load call took"], rows),
        "",
        f"**Failed requests: {summary['failed']}** of {summary['requests']}. p50 / p99 before the first change "
        f"{_f(before['p50_ms'])} / {_f(before['p99_ms'])} ms, from it on {_f(during['p50_ms'])} / "
        f"{_f(during['p99_ms'])} ms.",
    ]


def _stall(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rows = []
    for policy, p in summary["policies"].items():
        for phase, f in p["phases"].items():
            rows.append(
                [
                    f"{policy} (`{p['model']}`)",
                    phase,
                    f["requests"],
                    f["ok"],
                    f["tags"].get("features_unavailable", 0),
                    _errors(f["errors"]),
                    f["p99_ms"],
                    f["failed_p99_ms"],
                ]
            )
    stall = summary["policies"]["default"]["phases"]["stall"]
    return [
        f"Redis paused ({summary['stall_s']:g} s `CLIENT PAUSE ALL`: connections open, nothing answers) under load, "
        f"c={summary['concurrency_per_policy']} per policy. Policy `default` answers within its feature budget "
        "(`feature_spec.timeout_ms`), then at once while the circuit breaker is open; `reject` fails fast.",
        "",
        *_table(["policy", "phase", "requests", "ok", "flagged", "failed", "p99 ms", "failed p99 ms"], rows),
        "",
        f"**Policy `default` during the stall: {sum(stall['errors'].values())} failed, p99 {_f(stall['p99_ms'])} ms** "
        f"(target: none failed, p99 ≤ {summary['p99_budget_ms']:g} ms).",
    ]


def _rollouts(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    rows = [
        [
            r["setup"],
            f"c={r['concurrency']}",
            r["throughput_rps"],
            r["p50_ms"],
            r["p99_ms"],
            r.get("throughput_vs_none"),
            r.get("cpu_ms"),
            r.get("cpu_in_gateway_units"),
            r.get("cpu_vs_none"),
        ]
        for r in summary["rows"]
    ]
    return [
        "`fraud` through the gateway (the shared mesh, two replicas), its config loaded at run time: without the "
        "demo config's monitoring (prediction log of every request, drift windows) and without a traffic section; "
        "with the monitoring; and with the monitoring and a shadow getting a mirror of every batch, a 90/10 canary "
        "with its guard (10 % of the canary's batches also sent to the baseline), both. Mirrors run at the lowest "
        "priority on the same replicas and cores, so their cost shows as throughput here and as CPU per request of "
        "every mesh process together. That CPU is also given in units of the gateway's CPU of the same run: the "
        "gateway's work per request is the same in every setup, so the ratio cancels this machine's changes of "
        "speed between runs, which move throughput by more than what is measured. Two rounds, the second in "
        "reverse order; each setup's better throughput, lower CPU and median CPU in gateway units are shown.",
        "",
        *_table(
            [
                "setup",
                "load",
                "req/s",
                "p50 ms",
                "p99 ms",
                "req/s vs none",
                "mesh CPU ms/req",
                "mesh CPU in gateway units",
                "CPU vs none",
            ],
            rows,
        ),
    ]


def _priorities(s: dict[str, Any]) -> list[str]:
    rows = [
        [r["mix"], r["group"], f"c={r['concurrency']}", r["throughput_rps"], r["p50_ms"], r["p99_ms"], r["errors"]]
        for r in s["summary"]["rows"]
    ]
    return [
        "`fraud` through the gateway past the model's capacity (a dedicated mesh whose model services take "
        f"{s['summary']['model_delay_ms']:g} ms more per batch of at most {s['summary']['max_batch_size']} rows, so "
        "that requests queue at the router and the model services, not in the gateway's CPU), closed loops at "
        "once: a few clients, then the same clients sending "
        "Triton `priority` 1, among many at the default level. Every queue on the way (the gateway's and the "
        "router's coalescers, the model service's batcher) serves the higher priority first.",
        "",
        *_table(["mix", "clients", "load", "req/s", "p50 ms", "p99 ms", "failed"], rows),
    ]


def _http(s: dict[str, Any]) -> list[str]:
    rows = [
        [r["series"], f"c={r['concurrency']}", r["throughput_rps"], r["p50_ms"], r["p99_ms"], r["errors"]]
        for r in s["summary"]["rows"]
    ]
    return [
        "`fraud` through the gateway over each public protocol, closed loops: gRPC with tritonclient.grpc.aio, and "
        "the HTTP/REST front (KServe v2 REST, Triton's HTTP API) with an aiohttp client on kept-alive connections, "
        "JSON tensors or Triton's binary tensor extension (tritonclient.http's default). Past the gateway both take "
        "the same path; the differences are the edge's and the client's.",
        "",
        *_table(["protocol", "load", "req/s", "p50 ms", "p99 ms", "failed"], rows),
    ]


RENDER = {
    "floor": _floor,
    "overhead": _overhead,
    "features": _features,
    "batching": _batching,
    "failover": _failover,
    "outage": _outage,
    "slow": _slow,
    "overload": _overload,
    "tenants": _tenants,
    "malformed": _malformed,
    "soak": _soak,
    "models": _models,
    "stall": _stall,
    "rollouts": _rollouts,
    "priorities": _priorities,
    "http": _http,
}


def _gateway_p50_c1(by_name: dict[str, Any]) -> float | None:
    """Scenario 1's `fraud` through the gateway, p50 at c=1 (None: it did not run)."""
    if "overhead" not in by_name:
        return None
    c1 = {r["load"]: r for r in by_name["overhead"]["summary"]["rows"]}.get("c=1")
    return None if c1 is None else float(c1["gateway"]["p50_ms"])


def targets(data: dict[str, Any]) -> list[str]:
    """The issue's targets against this run's figures (rows only for the scenarios that ran)."""
    by_name = {scenario["name"]: scenario for scenario in data["scenarios"]}
    rows: list[list[Any]] = []

    def met(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    if "overhead" in by_name:
        lines_ = {r["load"]: r for r in by_name["overhead"]["summary"]["rows"]}
        c1 = lines_.get("c=1")
        if c1:
            p50 = c1["gateway"]["p50_ms"]
            rows.append(["`fraud` via gateway, p50 at c=1", "≤ 2.5 ms", f"{_f(p50)} ms", met(p50 <= 2.5)])
            added = c1["added_p50_ms"]
            rows.append(["mesh overhead over a direct call, p50 at c=1", "≤ 1 ms", f"{_f(added)} ms", met(added <= 1)])
        c64 = lines_.get("c=64")
        if c64:
            gw = c64["gateway"]
            ok = gw["throughput_rps"] >= 2500 and gw["p99_ms"] <= 50 and gw["errors"] == 0
            rows.append(
                [
                    "`fraud` via gateway at c=64",
                    "≥ 2,500 inferences/s, p99 ≤ 50 ms, 0 errors",
                    f"{_f(gw['throughput_rps'])}/s, p99 {_f(gw['p99_ms'])} ms, {gw['errors']} errors",
                    met(ok),
                ]
            )
    if "features" in by_name:
        for entities, budget in ((10, 1.0), (100, 5.0)):
            row = next(
                (
                    r
                    for r in by_name["features"]["summary"]["rows"]
                    if r["entities"] == entities and r["features"] == 50
                ),
                None,
            )
            if row:
                p99 = row["low"]["p99_ms"]
                rows.append(
                    [
                        f"feature read {entities} x 50 through the service, p99 at c={row['concurrency_low']}",
                        f"≤ {budget:g} ms",
                        f"{_f(p99)} ms",
                        met(p99 <= budget),
                    ]
                )
    if "batching" in by_name:
        speedup = by_name["batching"]["summary"].get("speedup_within_budget")
        rows.append(["dynamic batching vs off at equal p99", "≥ 3x", f"{_f(speedup)}x", met(speedup and speedup >= 3)])
    if "tenants" in by_name:
        summary = by_name["tenants"]["summary"]
        beside = summary["flood"]["beside calm"]
        p99 = beside["refused_p99_ms"]
        rows.append(
            [
                "a tenant past its quota refused (RESOURCE_EXHAUSTED) beside calm's load, p99 from send",
                "< 5 ms",
                f"{_f(p99)} ms over {beside['refused']} refusals",
                met(None if p99 is None else p99 < 5),
            ]
        )
        failed = sum(p["errors"] for p in summary["calm"].values())
        rows.append(
            [
                f"another tenant's requests during that flood (c={summary['calm_concurrency']})",
                "none refused or failed",
                f"{failed} failed; p99 {_f(summary['calm'].get('calm alone', {}).get('p99_ms'))} ms alone, "
                f"{_f(summary['calm'].get('calm with the flood', {}).get('p99_ms'))} ms with the flood",
                met(failed == 0),
            ]
        )
    if "malformed" in by_name:
        summary = by_name["malformed"]["summary"]
        big = [r for r in summary["rows"] if not r["kind"].startswith("reference")]
        costs = [r["cpu_per_rejection_ms"] for r in big if r["cpu_per_rejection_ms"] is not None]
        worst = max(big, key=lambda r: r["cpu_per_rejection_ms"] or 0.0, default=None)
        if worst is not None:
            rows.append(
                [
                    "rejecting a 16 MiB malformed request, gateway CPU",
                    f"≤ {summary['budget_ms']:g} ms",
                    f"{_f(worst['cpu_per_rejection_ms'])} ms at most ({worst['kind']})",
                    met(all(cost <= summary["budget_ms"] for cost in costs) if costs else None),
                ]
            )
    if "rollouts" in by_name:
        summary = by_name["rollouts"]["summary"]
        top = max(summary["concurrency"])
        rows_top = [r for r in summary["rows"] if r["concurrency"] == top]
        everything = next((r for r in rows_top if r["setup"].startswith("everything")), None)
        if everything is not None and everything.get("cpu_vs_none") is not None:
            cpu = everything["cpu_vs_none"]
            rows.append(
                [
                    f"shadowing, guards, drift windows and prediction logging together at c={top}",
                    "≤ 10 % of throughput (mesh CPU per request ≤ 110 % of none of them)",
                    f"mesh CPU {cpu * 100:.0f} % of none (in gateway units); throughput "
                    f"{everything['throughput_vs_none'] * 100:.0f} % of none",
                    met(cpu <= 1.1),
                ]
            )
    if "soak" in by_name:
        growth = by_name["soak"]["summary"]["growth_pct"]
        worst = max(growth.values(), default=0.0)
        run = by_name["soak"]["runs"][0]
        rows.append(
            [
                f"RSS over {run['duration_s']:g} s at c={run['concurrency']}",
                "flat within 10 %",
                f"largest change {worst:+.1f} %",
                met(worst <= 10 and (run["duration_s"] >= 300 or None)),
            ]
        )
    if "floor" in by_name:
        floor = {(r["series"], r["concurrency"]): r for r in by_name["floor"]["summary"]["rows"]}
        for series, label in (("mesh topology", "unary calls"), ("mesh topology, hop streams", "hop streams")):
            mesh_floor = floor.get((series, 1))
            if mesh_floor:
                rows.append(
                    [
                        f"(floor) empty servers in the mesh's topology, {label}, p50 at c=1",
                        "-",
                        f"{_f(mesh_floor['p50_ms'])} ms",
                        "-",
                    ]
                )
            best = max(
                (r for r in by_name["floor"]["summary"]["rows"] if r["series"] == series),
                key=lambda r: r["throughput_rps"],
                default=None,
            )
            if best:
                rows.append(
                    [
                        f"(floor) empty servers in the mesh's topology, {label}, best throughput",
                        "-",
                        f"{_f(best['throughput_rps'])}/s at c={best['concurrency']}",
                        "-",
                    ]
                )
        unary_floor = floor.get(("mesh topology", 1))
        gateway_c1 = _gateway_p50_c1(by_name)
        if unary_floor and gateway_c1 is not None and unary_floor["p50_ms"]:
            ratio = gateway_c1 / unary_floor["p50_ms"]
            rows.append(
                [
                    "`fraud` via gateway p50 at c=1 over the unary floor's",
                    "≤ 1.3x",
                    f"{ratio:.2f}x ({_f(gateway_c1)} / {_f(unary_floor['p50_ms'])} ms)",
                    met(ratio <= 1.3),
                ]
            )
    return _table(["target", "wanted", "this run", ""], rows)


def runs_table(scenario: dict[str, Any]) -> list[str]:
    rows = []
    for r in scenario["runs"]:
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate_rps']:.0f}/s open"
        lat = r["latency_ms"]
        rows.append(
            [r["series"], load, r["requests"], _errors(r["errors"]), r["throughput_rps"]]
            + [lat[p] for p in ("p50", "p90", "p95", "p99")]
        )
    header = ["series", "load", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms"]
    return _table(header, rows)


def machine_line(machine: dict[str, Any]) -> str:
    gpu = machine["gpu"] if machine.get("cuda") else "no CUDA GPU"
    return (
        f"{machine['nproc']} cores ({machine['cpu']}), {machine['memory_gib']} GiB RAM, {machine['os']}; "
        f"Python {machine['python']}, torch {machine['torch']}, grpcio {machine['grpcio']}, "
        f"tritonclient {machine['tritonclient']}, {machine['redis_server'].split(' sha=')[0]}; {gpu}"
    )


def markdown(data: dict[str, Any], *, plot_path: str | None, full: bool, gpu: dict[str, Any] | None = None) -> str:
    """BENCHMARKS.md. `gpu`: results of scenario 3 taken on a CUDA machine (bench/gpu_results.json), if any."""
    options = data["options"]
    lines = [
        "# Benchmarks",
        "",
        "Figures from `make bench` (`python -m bench`): the local mesh as `make run` starts it (private Redis, feature "
        "service, two model replicas, router, gateway, each its own process), driven by the project's load "
        "generator with `tritonclient.grpc.aio` as the client. Raw results of every run: `bench/results/` "
        "(git-ignored).",
        "",
        f"**Machine**: {machine_line(data['machine'])}. The load generator runs on the same machine and shares its "
        "cores with all the services and Redis: the figures are for the whole system on that machine, client "
        "included, not for a service alone.",
        "",
        f"Taken {data['started']} in {data['seconds']:.0f} s"
        + ("" if full else " (a partial or `--quick` run: figures are indicative only)")
        + f". Each sweep point: {options['warmup_s']:g} s warm-up (discarded), then {options['duration_s']:g} s "
        "measured.",
        "",
        "**Method** (as perf_analyzer): closed loop = N concurrent requests, each sent as soon as the previous one "
        "answered; open loop = Poisson arrivals at a fixed rate, latency from the scheduled arrival. Latency "
        "percentiles are nearest-rank over successful requests sent in the measurement window (every one awaited, "
        "so no failure escapes the counts); throughput = successful answers that arrived within the window / "
        "window; errors counted by gRPC status code.",
    ]
    if plot_path:
        lines += ["", f"![latency percentiles vs throughput per scenario]({plot_path})"]
    defects = [d for s in data["scenarios"] for d in s.get("defects", [])]
    defects += [f"scenario {c['name']} did not finish: {c['error'].splitlines()[-1]}" for c in data.get("crashed", [])]
    lines += ["", "## Defects seen", ""]
    lines += [f"- {d}" for d in defects] if defects else ["None in this run."]
    lines += ["", "Defects earlier runs found, fixed in the mesh since:", "", *[f"- {d}" for d in FIXED_DEFECTS]]
    findings = [f for s in data["scenarios"] for f in s.get("findings", [])]
    if findings:
        lines += ["", "Other findings:", "", *[f"- {f}" for f in findings]]
    lines += ["", "## Targets", "", *targets(data)]
    lines += [
        "",
        "## Changes on the request path, with before/after",
        "",
        "Each measured back to back (before, then after, on the same machine minutes apart; runs taken at "
        "different times here vary by ±20 %). Where the time goes and why: docs/performance.md.",
        "",
        *_table(["change", "before", "after", "how measured"], [list(row) for row in SPEED_CHANGES]),
    ]
    for scenario in data["scenarios"]:
        lines += ["", f"## {scenario['title']}", ""]
        lines += RENDER[scenario["name"]](scenario)
    if not data["machine"].get("cuda"):
        lines += ["", "## GPU", ""]
        gpu_batching = next((s for s in (gpu or {}).get("scenarios", []) if s["name"] == "batching"), None)
        if gpu_batching is None:
            lines += [
                "No CUDA GPU on the bench machine: scenario 3 ran on CPU only. On a machine with one, "
                "`make bench BENCH_ARGS='--scenarios batching --device cuda'` runs it there."
            ]
        else:
            assert gpu is not None
            lines += [
                "No CUDA GPU on the bench machine. Scenario 3 was run on its own on a lent GPU machine "
                f"({gpu['started']}; `python -m bench --scenarios batching --device cuda`, client on the same "
                "machine; results in bench/gpu_results.json):",
                "",
                f"**GPU machine**: {machine_line(gpu['machine'])}. Not comparable with the CPU figures above: "
                "other CPU, 16 cores.",
                "",
                *_batching(gpu_batching),
            ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "make bench                                   # everything, ≈ 15 minutes on the machine above",
        "make bench BENCH_ARGS=--quick                # every scenario, short, under a minute",
        "make bench BENCH_ARGS='--scenarios overhead,failover --duration 10 --concurrency 1,16,64'",
        "make bench BENCH_ARGS='--scenarios features --concurrency 128,256'   # feature reads past 100 at once",
        "make bench BENCH_ARGS='--scenarios overload'                          # shedding at 3 x capacity",
        "make bench BENCH_ARGS='--scenarios models'                           # versions changed under load",
        "make bench BENCH_ARGS='--scenarios stall'                            # a 3 s Redis stall under load",
        "make bench BENCH_ARGS='--scenarios tenants,malformed'                 # fair share, malformed requests",
        "make bench BENCH_ARGS='--scenarios batching --device cuda'           # scenario 3 on a GPU",
        "make bench BENCH_ARGS='--scenarios http --concurrency 1,64'          # gRPC against the HTTP/REST front",
        "```",
        "",
        "BENCHMARKS.md and bench/latency_vs_throughput.png are rewritten by a full run of every scenario "
        "(or with `--write-markdown`); every run writes `bench/results/<time>/results.json`, `summary.md` and "
        "`latency_vs_throughput.png`.",
        "",
    ]
    return "\n".join(lines)


SPEED_CHANGES = (
    (
        "natural batching for `fraud` (`max_queue_delay_us` 200 → 0)",
        "model service straight, c=1 p50 2.25 ms",
        "1.08 ms",
        "500 calls at c=1",
    ),
    ("hiredis reply parser", "`read_many` 100 x 50 p99 1.40 ms", "0.59 ms", "5,000 calls in-process"),
    (
        "uvloop as every service's event loop",
        "gateway c=1 p50 5.91 / 4.95 / 6.02 / 5.50 ms",
        "3.66 / 3.86 / 5.45 / 3.78 ms",
        "four A/B pairs of scenario 1",
    ),
    (
        "gateway coalescing: concurrent requests share one segmented router call",
        "c=64 664 / 611 req/s",
        "1,656 / 1,503 req/s",
        "two A/B pairs, raw gRPC client, 5 s",
    ),
    (
        "one router call in flight per model at the gateway (was 4)",
        "c=64 1,656 / 1,503 / 1,261 / 985 req/s",
        "1,899 / 2,203 req/s",
        "raw gRPC client, 5 s per point",
    ),
    (
        "handlers wrapped at registration instead of a server interceptor",
        "c=64 2,212 / 2,399 req/s; c=1 p50 4.67 / 6.61 / 6.49 ms",
        "2,390 / 2,463 req/s; 4.54 / 6.27 / 6.16 ms",
        "back-to-back pairs, raw gRPC client (trivial server: 4,020 → 4,470 calls/s)",
    ),
    (
        "`gc.freeze()` after warm-up",
        "gateway full GC passes under load: up to 39 ms each, 250 ms in 15 s",
        "~1 ms each",
        "gc.callbacks in each process, c=64",
    ),
    (
        "the gateway hardened and the telemetry completed (credentials checked before parsing, shapes validated "
        "before decoding, tenant quotas, raw contents kept apart above 64 KiB, a trace context per request in the "
        "coalescers, stream messages counted, timing when asked)",
        "gateway c=1 p50 10.56 ms; c=64 1,061 req/s, p99 84.0 ms; c=128 1,156 req/s; gateway CPU per request at "
        "c=64 0.830 / 0.805 ms",
        "10.51 ms; 1,054 req/s, p99 84.4 ms; 1,120 req/s; 0.826 / 0.901 ms",
        "back to back: scenario 1, and two pairs of CPU per request from /proc over 8,000 requests at c=64 (no "
        "change beyond this machine's noise; one parse path was 12 µs slower per small request until small "
        "requests were parsed whole again)",
    ),
    (
        "raw contents kept apart from the parsed request (views of the received bytes) and refusals answered "
        "outside the `except` block (no reference cycle through gRPC's abort)",
        "rejecting a 15.9 MiB malformed request at the gateway: 12.5 ms user + 34.2 ms system CPU; RSS +896 MiB "
        "over 40 refusals",
        "8.2 ms + 8.0 ms; RSS +105 MiB, then flat",
        "back to back, 40 refusals each, gateway CPU and VmRSS from /proc (the handler's own share is now 0.04 ms: "
        "the rest is gRPC receiving 16 MiB)",
    ),
    (
        "one shape for every hop: internal `Router/InferBatch` instead of the in-band segments parameter, one "
        "OIP dataplane and servicer, one `Deadline`, the feature join as `router/join.py` (structure only)",
        "gateway c=1 p50 9.65 / 8.53 ms, c=64 1,060 / 1,150 req/s; batching on c=32 943 / 916 req/s; "
        "CPU per request at c=64: gateway 0.753, router 0.239, feature service 0.118 ms",
        "9.86 / 10.56 ms, 1,081 / 962 req/s; 886 / 1,074 req/s; 0.754, 0.240, 0.119 ms",
        "two back-to-back pairs of scenarios 1 and 3 (before→after, then after→before), a slow phase of this "
        "machine (direct calls also moved ±25 % between runs); CPU per request from /proc over 8,000 requests "
        "at c=64 per side: no change beyond noise",
    ),
    (
        "model versions per replica: the router sends a version only to replicas that take it, the model "
        "service counts Triton's statistics per batch and request, version states looked up per request (#13)",
        "c=64 1,423 / 1,442 and 1,694 / 1,497 req/s; CPU per request at c=64: gateway 0.606 / 0.604 and 0.521"
        " / 0.585 ms, router 0.189 / 0.187 and 0.163 / 0.184 ms; c=1 p50 with timing 7.17 / 6.90 ms",
        "1,327 / 1,321 and 1,499 / 1,676 req/s; gateway 0.646 / 0.646 and 0.578 / 0.517 ms, router 0.209 / "
        "0.208 and 0.186 / 0.170 ms; 6.69 / 6.33 ms",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc; c=1: 2,000 sequential requests per side with `infermesh_timing` (every hop's part unchanged "
        "or lower): no change beyond this machine's noise",
    ),
    (
        "feature reads within a per-model budget behind a circuit breaker (router), failed batches bisected "
        "(model service; nothing added when a pass succeeds)",
        "c=64 1,575 / 1,408 and 1,349 / 1,221 req/s; CPU per request at c=64: gateway 0.554 / 0.610 and 0.655"
        " / 0.704 ms, router 0.179 / 0.196 and 0.202 / 0.220 ms; c=1 p50 6.40 and 7.34 ms",
        "1,562 / 1,398 and 1,430 / 1,310 req/s; gateway 0.547 / 0.623 and 0.610 / 0.658 ms, router 0.176 / "
        "0.200 and 0.195 / 0.217 ms; 5.92 and 6.85 ms",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc: no change beyond this machine's noise (it slowed by ~10 % over the four runs)",
    ),
    (
        "one retry layer (the gateway re-sends only what no router answered) and a retry budget per "
        "downstream (gRPC A6 throttling)",
        "c=64 1,466 / 1,356 and 1,532 / 1,369 req/s; CPU per request at c=64: gateway 0.595 / 0.636 and 0.550"
        " / 0.624 ms, feature service (unchanged) 0.095 / 0.106 and 0.091 / 0.105 ms",
        "1,099 / 1,442 and 1,243 / 1,230 req/s; gateway 0.761 / 0.585 and 0.707 / 0.692 ms, feature service "
        "0.130 / 0.104 and 0.117 / 0.115 ms",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc. The after runs fell in a slower phase: the feature service, whose code did not change, cost "
        "13 % more per request in them too; the gateway's CPU relative to it is 6.07 before and 5.88 after: "
        "no change of its own",
    ),
    (
        "adaptive admission at the gateway (off by default: the static cap through the new limiter, nothing measured)",
        "c=64 1,360 / 1,435 and 1,285 / 1,434 req/s; CPU per request at c=64: gateway 0.650 / 0.598 and 0.668"
        " / 0.594 ms; c=1 p50 6.23 and 6.69 ms",
        "1,380 / 1,302 and 1,511 / 1,507 req/s; gateway 0.632 / 0.658 and 0.564 / 0.541 ms; 7.09 and 6.47 ms",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc: no change beyond this machine's noise",
    ),
    (
        "hedged model calls: a call still out after the recent p95 gets a copy on another replica (≤ 5 % of calls)",
        "c=64 1,668 / 1,438 and 1,384 / 1,486 req/s; CPU per request at c=64: router 0.170 / 0.195 and 0.196 "
        "/ 0.189 ms (2.03x the unchanged feature service's); c=1 p50 6.40 and 6.06 ms",
        "1,515 / 1,573 and 1,519 / 1,464 req/s; router 0.182 / 0.183 and 0.190 / 0.193 ms (2.05x); 5.93 and 6.49 ms",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc: no change beyond this machine's noise (a task and a timer per model call, per batch of "
        "coalesced requests). Scenario 6 with one replica 25 ms slow: p99 1.14x / 1.07x / 0.87x the healthy "
        "mesh's at c=1 / 8 / 32 (target ≤ 1.2x); without hedging 2.10x at c=1",
    ),
    (
        "the model services fix glibc's mmap threshold at 128 KiB (weights and large tensors in mappings of "
        "their own, returned to the OS when freed)",
        "scenario 3 (`--quick`, c=32): batching on 1,439 / 1,210 req/s, off 513 / 494 req/s; model service "
        "RSS over 400 loads 363 → 423-438 MiB",
        "1,690 / 1,389 req/s, off 436 / 466 req/s; RSS 363.2 → 363.7 MiB",
        "two back-to-back pairs (before→after, then after→before) of scenario 3 quick, and the 400-cycle RSS "
        "run: batched throughput within noise (higher in both pairs), unbatched 8 % lower on average, within "
        "this machine's noise; memory flat",
    ),
    (
        "a shared batch all of whose callers left is cancelled with its downstream calls (coalescer; checked "
        "on the cancel path, two attribute stores per request otherwise)",
        "c=64 1,536 / 1,588 req/s; CPU per request: gateway 0.552 / 0.538, router 0.188 / 0.180, feature "
        "service (unchanged) 0.093 / 0.087 ms",
        "1,398 / 1,478 req/s; gateway 0.604 / 0.577, router 0.203 / 0.200, feature service 0.102 / 0.095 ms",
        "back to back (after→before), two 6 s rounds at c=64, CPU from /proc: the after run fell in a slower "
        "phase (the unchanged feature service cost 9 % more too); relative to it the gateway is 6.00x after "
        "and 6.09x before, the router 2.05x and 2.06x: no change of their own. A first version with a "
        "callback per request measured +2-4 % relative CPU and was replaced",
    ),
    (
        "Triton's `priority` and `timeout` parameters taken in the router's queue (checked per request; an "
        "ordered insert only when a lower priority is queued last)",
        "c=64 1,543 / 1,530 and 1,292 / 1,517 req/s; router CPU per request 0.182 / 0.186 and 0.219 / 0.189 "
        "ms (2.08x the unchanged feature service's)",
        "1,738 / 1,570 and 1,400 / 1,328 req/s; router 0.166 / 0.187 and 0.207 / 0.218 ms (2.15x)",
        "two back-to-back pairs (before→after, then after→before), two 6 s rounds at c=64 each, CPU from "
        "/proc: the router's average is unchanged (0.194 → 0.195 ms); relative to the feature service +3 %, "
        "within this measure's spread",
    ),
    (
        "priority in the model service's batch queue too (the router passes its batch's most urgent priority)",
        "c=64 1,548 / 1,378 req/s; CPU per request: router 0.183 / 0.206, model services 0.103 / 0.123 ms",
        "1,721 / 1,652 req/s; router 0.169 / 0.177, model services 0.092 / 0.098 ms",
        "back to back (before→after), two 6 s rounds at c=64, CPU from /proc: no change beyond this machine's"
        " noise (the after run was in a faster phase)",
    ),
    (
        "feature store at scale (#16): the read path picks MGET or a per-shard pipeline, and feeds the age "
        "histogram per view (one searchsorted per read); the join applies `on_stale` and answers ages on request",
        "gateway c=64 1,098 / 1,233 req/s (single Redis)",
        "1,651 / 1,206 req/s",
        "two back-to-back pairs of scenario 1 at c=64, 5 s (before→after→before→after): no slowdown beyond this "
        "machine's noise (the unchanged direct path moved 1,318-1,977 req/s over the same runs)",
    ),
    (
        "traffic sections (#14): `_serve` split into per-version answers (a model without a section takes the "
        "same path as before, one more call); INTERNAL from below is ModelFailed (not retried)",
        "c=64 1,675 / 1,225 / 1,593 / 1,807 req/s (mean 1,575); router CPU per request 0.159 / 0.182 / 0.152 / "
        "0.145 ms (mean 0.160); c=1 p50 4.92 / 4.76 ms",
        "1,414 / 1,717 / 1,540 / 1,578 req/s (mean 1,562); router 0.166 / 0.145 / 0.171 / 0.175 ms (mean 0.164);"
        " c=1 p50 4.73 / 4.97 ms",
        "two back-to-back pairs (before, after, before, after), two 6 s rounds at c=64 each and one at c=1, CPU "
        "from /proc, other work sharing the cores: within this machine's noise (router CPU +2.5 %)",
    ),
    (
        "drift windows per model version in the router (binning each coalesced batch, PSI every 5 s)",
        "c=64 1,981 / 2,099 req/s; CPU per request: router 0.149 / 0.139 ms",
        "2,106 / 1,824 req/s; router 0.146 / 0.165 ms",
        "back to back (before→after), two 6 s rounds at c=64 through the gateway, CPU from /proc: within this"
        " machine's noise (prediction log off: the fraud model does not opt in)",
    ),
    (
        "the tenant travels with each request (internal metadata on a forwarded call, a field per batch segment) "
        "and the model service counts requests in a version's first minute after READY (#15, cold starts)",
        "c=64 1,682 / 1,949, 1,918 / 1,953 and 2,039 / 1,327 req/s; CPU per request: gateway 0.471 / 0.425, "
        "0.423 / 0.412 and 0.418 / 0.437 ms, router 0.175 / 0.149, 0.151 / 0.135 and 0.153 / 0.175 ms",
        "1,967 / 2,283 and 1,669 / 1,384 req/s; gateway 0.421 / 0.390 and 0.429 / 0.437 ms, router 0.157 / 0.137 "
        "and 0.155 / 0.167 ms",
        "back to back (before→after→before, the tenant alone; then after→before with the cold-start count too, on "
        "a loaded machine), two 6 s rounds at c=64 through the gateway, CPU from /proc: CPU per request unchanged "
        "within this machine's noise (prediction log off: the fraud model does not opt in)",
    ),
    (
        "internal hops on hop streams (#17): a call to a quiet peer as a message on a long-lived stream, "
        "other calls unary (`*_HOP_STREAM_QUIET_US` 500)",
        "unary calls: c=1 p50 5.18 / 5.22 / 5.11 / 4.80 / 5.08 / 4.98 / 5.00 ms; CPU per request of the whole "
        "mesh at c=1 5.07 / 4.93 / 4.88 / 4.82 ms, at c=64 0.536 / 0.552 / 0.554 / 0.613 ms (2,613 / 2,544 / "
        "2,511 / 2,210 req/s)",
        "c=1 p50 4.34 / 4.22 ms, CPU 4.37 / 4.22 ms; c=64 0.590 / 0.598 ms (2,364 / 2,349 req/s). Every call "
        "on a stream: c=1 4.49 / 4.45 / 4.66 ms but c=64 2,242 / 2,455 / 2,327 req/s against 2,678 / 2,394 / "
        "2,652 unary",
        "scenario 1 at c=1 and c=64 (8 s) and a CPU probe (/proc, every process of the mesh), alternating "
        "unary and streams: c=1 p50 and CPU -13 %; c=64 CPU +2 % on average, within this machine's noise. All "
        "calls on streams (and 1 or 2 per stream) cost 5-10 % more CPU at c=64, hence the quiet rule "
        "(docs/performance.md)",
    ),
    (
        "the model service runs a forward pass on its event loop when nothing else is queued and recent "
        "passes took under `MODEL_SERVICE_INLINE_FORWARD_MAX_US` (500 µs), instead of the worker thread (#17)",
        "model services' CPU per request at c=1 0.920 / 0.858 ms (1.26x / 1.25x the unchanged feature "
        "service's), at c=64 0.058 / 0.060 ms (1.14x / 1.15x)",
        "0.759 / 0.823 ms (1.08x / 1.09x); 0.054 / 0.060 ms (1.06x / 1.05x)",
        "two back-to-back pairs (before→after, twice) of a CPU probe through the gateway (/proc, every "
        "process), 8 s at c=64 and 5 s at c=1: the model service -13 % CPU per request at c=1, no loss at "
        "c=64; end-to-end p50 within this machine's noise",
    ),
    (
        "hop streams and the inline forward pass together, against NVIDIA Triton (`vs_triton.sh` under `make run`)",
        "internal hops unary, forward passes on the worker thread: p50 at c=1 1.92x Triton's (5.15 vs 2.68 "
        "ms), c=64 throughput 0.88x (2,581 vs 2,949 req/s)",
        "1.62x (4.57 vs 2.81 ms) and 1.71x (4.48 vs 2.62 ms); 0.92x (2,630 vs 2,867) and 0.88x (2,453 vs 2,779 req/s)",
        "three runs of the script one after another (after, before, after), 8 s per point, Triton measured in "
        "each: c=1 closer to Triton by 11-16 %, c=64 unchanged within noise",
    ),
    (
        "gRPC core's epoll engine instead of EventEngine in every service "
        "(`GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`, set before grpc is imported)",
        "EventEngine (grpcio 1.85's default): c=1 p50 4.06 / 4.05 ms, CPU per request of the whole mesh 4.13 "
        "/ 4.09 ms; c=64 2,579 / 2,792 req/s, 0.558 / 0.518 ms. One process, empty unary call: 623-650 µs, "
        "CPU 580-620 µs",
        "c=1 3.76 / 3.51 ms, CPU 3.74 / 3.56 ms; c=64 3,149 / 3,354 req/s, 0.466 / 0.447 ms. Empty call: "
        "422-457 µs, CPU 362-392 µs",
        "two back-to-back pairs (before→after, twice) of a CPU probe through the gateway (/proc, every "
        "process; 5 s at c=1, 8 s at c=64), and 3,000 calls in one process per variant: c=1 p50 -10 %, c=64 "
        "throughput +21 %, CPU per request -9 % / -15 %",
    ),
    (
        "hop streams only while no other internal call of the service is in flight "
        "(`*_HOP_STREAMS_UNDER_LOAD=false`) instead of only to a quiet peer (both on the epoll engine)",
        "rule per peer: c=64 CPU per request 0.506 / 0.520 ms against unary calls' 0.460 / 0.502 ms (+7 %); "
        "c=1 p50 3.70 / 3.54 ms against 4.19 / 4.26 ms",
        "c=64 0.548 / 0.498 / 0.499 ms against unary calls' 0.521 / 0.530 / 0.512 ms (-1 %); c=1 p50 3.73 / "
        "3.70 / 3.77 ms against 4.42 / 4.40 / 4.42 ms (-16 %)",
        "CPU probe through the gateway (/proc, every process), each variant alternating with a unary-calls "
        "run: batched calls to one replica are sparse even at c=64, so a per-peer rule kept putting them on "
        "streams",
    ),
    (
        "the epoll engine and the in-flight rule, against NVIDIA Triton (`vs_triton.sh` under `make run`)",
        "hop streams per quiet peer, inline forward pass, EventEngine: p50 at c=1 1.62x / 1.71x Triton's, "
        "c=64 throughput 0.92x / 0.88x",
        "1.45x (3.81 vs 2.62 ms) and 1.52x (3.95 vs 2.61 ms); 0.88x (2,719 vs 3,101) and 0.93x (2,726 vs 2,926 req/s)",
        "two runs of the script, 8 s per point, Triton measured in each (its load generator, in PyTriton's "
        "venv, keeps gRPC's default engine): c=1 closer to Triton by another ~10 %; c=64 unchanged against it",
    ),
    (
        "the public gateway back on gRPC's EventEngine, the internal services alone on the epoll engine "
        "(`infermesh/grpc_engine.py`: set for the import of grpc only, so child processes are not affected)",
        "every process on the epoll engine: scenario 7 (`--quick`, 3x capacity) accepted 1,041 / 1,041 / "
        "1,031 / 1,131 req/s, p99 from send 518-559 ms; `vs_triton.sh` p50 at c=1 1.45x / 1.52x, c=64 0.88x / "
        "0.93x",
        "accepted 1,815 / 2,759 req/s, p99 from send 359-366 ms (every process on EventEngine: 2,038 / "
        "2,411); 1.64x / 1.60x, 0.79x / 0.88x",
        "scenario 7 quick, two runs per variant, and the gateway alone switched (2,017 / 1,592 req/s) to find "
        "the process that mattered; two `vs_triton.sh` runs: the edge keeps its flood behaviour for ~0.1 ms "
        "more CPU per request at c=1",
    ),
    (
        "the gateway keeps freed message buffers in its heap for the next message (`infermesh/heap.py`: "
        "glibc's mmap threshold fixed just above the max message, trim threshold twice that) instead of "
        "a fresh mapping per large message (#10)",
        "rejecting a 15.9 MiB malformed request: 34.4 / 32.8 / 33.2 ms of gateway CPU (user 4.4-7.0, "
        "system 26.4-30.0 ms), client p50 30-34 ms",
        "10.2 / 9.2 / 9.2 and 11.0 / 8.8 / 9.0 ms (user 4.6-6.4, system 3.2-6.0 ms), client p50 12-14 "
        "ms; VmRSS settles ~120 MiB above idle after the first kind, then +22 / +28 MiB over the other "
        "150 refusals",
        "scenario 9 (50 refusals per kind, one at a time), before and then twice after; the page faults "
        "of the copy into a fresh 16 MiB buffer were two thirds of the cost (perf). Requests under 128 "
        "KiB (every `fraud` request) allocate nothing the new thresholds concern",
    ),
    (
        "the request-path changes of 2026-12-03 together: the gateway's heap thresholds, refusal messages "
        "cut to 1,024 characters, Triton's classification extension (a dict check per request that asks "
        "for none) and `triton_final_response` on stream answers",
        "5bd49c3: c=64 1,811 / 1,639 / 1,570 / 1,459 req/s (mean 1,620), CPU per request of the whole "
        "mesh 0.792 / 0.884 / 0.921 / 0.967 ms (gateway mean 0.528); c=1 p50 5.96 / 5.48 / 5.87 / 5.73 "
        "ms",
        "1,597 / 1,618 / 1,814 / 1,470 req/s (mean 1,625), 0.895 / 0.884 / 0.811 / 0.938 ms (gateway "
        "mean 0.520); c=1 p50 6.04 / 7.32 / 4.19 / 6.47 ms",
        "CPU probe through the gateway (/proc, every process; 5 s at c=1, 8 s at c=64), four "
        "back-to-back pairs alternating the two trees on a machine busier than on other days (every "
        "figure ~1.5x slower than this morning's): no change beyond this machine's noise",
    ),
    (
        "the gateway also serves HTTP/REST (`GATEWAY_HTTP_PORT`, aiohttp on the gateway's event loop; `make run` "
        "turns it on at 8000)",
        "port off: gRPC c=1 p50 4.19 / 4.16 ms, c=64 2,233 / 2,539 req/s (p99 52.6 / 46.2 ms)",
        "port on: 4.18 / 4.15 ms, 2,602 / 2,291 req/s (46.2 / 51.6 ms); over REST itself (aiohttp client, "
        "JSON): c=1 p50 3.74 ms, c=64 3,140 / 2,973 req/s, p99 33 ms, against Triton's HTTP port 2.78 / 2.58 ms "
        "and 3,022 / 3,278 req/s",
        "`make run` with the port off and on, alternating (off, on, off, on), tritonclient.grpc.aio closed loop "
        "(`v2load.py`) 6 s at c=1 and 8 s at c=64: no change to gRPC clients beyond noise. REST figures and the "
        "method: docs/performance.md",
    ),
    (
        "the HTTP/REST front reads a body of known length into one buffer of that size (each chunk "
        "copied once; aiohttp's `read()` grows a buffer and copies it again)",
        "rejecting a 15.9 MiB malformed binary-tensor request over HTTP: 20.8 / 21.8 ms of gateway CPU; "
        "`fraud` over HTTP/REST (JSON) c=1 p50 4.88 / 4.91 ms, c=64 2,188 / 2,107 req/s",
        "11.5 / 11.5 / 12.0 ms (gRPC's, same runs: 10.0-11.0 ms); 4.71 / 4.74 ms, 2,095 / 2,252 req/s",
        "40 refusals one at a time, gateway CPU from /proc; then two alternating pairs of a 6 s aiohttp "
        "closed loop (before, after, before, after) in a slow phase of this machine: small requests "
        "unchanged within noise",
    ),
    (
        "`make run`'s private Redis keeps an append-only file synced every second (it kept only a snapshot "
        "per 60 s), so that the supervisor's restart of a killed redis-server loses at most a second of writes",
        "Redis CPU per request at c=64 0.019 / 0.017 ms; whole mesh with Redis 1.08 / 0.99 ms, 1,369 / 1,504 req/s",
        "0.024 / 0.025 and 0.025 / 0.026 ms; 1.02 / 1.12 and 1.14 / 1.19 ms, 1,437 / 1,317 and 1,293 / 1,243 req/s",
        "`v2load.py` c=64, 8 s, CPU of each process from /proc, after, before, after (two runs each) on "
        "`make run`: Redis pays ~7 µs per request (the prediction log's stream writes); the mesh's totals "
        "moved more with this machine's noise than that. The bench's own meshes do not persist Redis",
    ),
    (
        "the HTTP/REST front reads a request body within the call's deadline (a timer around the read; a body "
        "that does not arrive in time is 504 and its connection and bytes are let go)",
        "`fraud` over HTTP/REST (JSON, aiohttp client) c=64: 2,031 / 2,108 and 2,081 / 2,129 req/s, gateway CPU "
        "0.334 / 0.334 and 0.311 / 0.326 ms per request",
        "2,044 / 2,402 and 1,735 / 1,933 req/s, 0.331 / 0.283 and 0.416 / 0.364 ms",
        "6 s closed loops on `make run`, before, after, before, after (two runs each): no change beyond this "
        "machine's noise, which moved the second pair of runs by 20 %",
    ),
    (
        "the gateway decides each gRPC call from its metadata as it starts (credentials checked in the generic "
        "handler's lookup, before gRPC reads the body; the handler checks them again: a dict lookup), and "
        "remembers verified JWTs until they expire",
        "`fraud` via gateway c=64 (`v2load.py`): 2,238 / 2,191 and 2,395 / 2,448 req/s, p99 50.4 / 52.6 and "
        "41.6 / 40.9 ms; gateway CPU 0.378 / 0.387 and 0.360 / 0.359 ms per request",
        "2,472 / 2,436 and 2,209 / 2,192 req/s, p99 48.8 / 42.1 and 45.2 / 50.5 ms; 0.357 / 0.362 and 0.384 / 0.384 ms",
        "8 s closed loops on `make run`, before, after, before, after (two runs each): no change beyond this "
        "machine's noise (the same code measured 0.36 and 0.38 ms minutes apart)",
    ),
    (
        "Redis commands packed by hiredis (C) instead of redis-py's asyncio packer (Python) on the mesh's own "
        "pools (feature store, Sentinel, prediction log and its index), and the prediction log's records cheaper "
        "to build (one-shot HMAC of entity ids, no JSON for empty flags, one counter update per batch)",
        "XADD of a 12-field prediction record packed in 27 µs; `fraud` via gateway c=64 (`v2load.py`, 8 s, `make "
        "run`): router CPU 0.342 / 0.286 / 0.318 / 0.398 / 0.403 / 0.357 / 0.287 ms per request, 0.50 (0.49-0.52) "
        "of the gateway's in the same run; feature service 0.13 of the gateway's",
        "4 µs, byte for byte the same; router 0.289 / 0.279 / 0.276 / 0.252 / 0.300 / 0.297 / 0.308 / 0.281 / "
        "0.353 ms, 0.47 (0.45-0.49) of the gateway's; feature service 0.13",
        "seven and nine runs alternating the two packers (a switch for the measurement only) on a machine whose "
        "speed moved 1.5x between runs: every process slowed together, so the router is compared with the "
        "unchanged gateway of the same run: ~6 % less router CPU, ~0.02 ms per request (the log's XADD per "
        "request). The feature service's reads are a few commands per batch: no change",
    ),
    (
        "the prediction log's writer lingers 20 ms for more records before each pipelined round trip to Redis",
        "`fraud` via gateway c=64 (`v2load.py`, 8 s, `make run`): Redis CPU 0.029 / 0.026 / 0.026 / 0.023 ms per "
        "request, 0.043 (0.041-0.044) of the gateway's in the same run; router 0.469 of the gateway's",
        "0.023 / 0.020 / 0.024 / 0.019 ms, 0.034 (0.033-0.036) of the gateway's; router 0.464",
        "four pairs alternating the two writers (a switch for the measurement only), each process compared with "
        "the unchanged gateway of the same run: Redis spends a fifth less per request (fewer, larger pipelines); "
        "the router's change is within noise. Records reach the stream up to 20 ms later, off the request path",
    ),
    (
        "the gateway refuses a ModelInfer call its tenant's quota or its admission limit would refuse as the call "
        "starts (in the generic handler's lookup, before gRPC reads the body), not after parsing it",
        "scenario 8: the flood tenant's refusals beside calm's load p50 / p99 4.35 / 17.14 ms, alone 1.73 / 7.46 "
        "ms; calm with the flood p99 33.7 ms",
        "4.87 / 17.41 and 3.95 / 15.90 ms, alone 1.83 / 6.36 and 1.41 / 6.58 ms; calm with the flood p99 39.9 and "
        "37.1 ms",
        "after, before, after (`make bench BENCH_ARGS='--scenarios tenants'`): no change beyond noise; a "
        "refusal's latency is the gateway's event loop's queue, not the body's parse. What changes: a call past "
        "the quota whose body never comes is refused at once instead of waiting for it, and the excess costs no "
        "body read",
    ),
    (
        "the prediction log writes each batch of records with one Lua script call (each record's XADD, index "
        "HSET and EXPIRE inside it) instead of a pipeline of three commands per record; a Redis that refuses "
        "scripts (ACL) gets the pipeline",
        "`fraud` via gateway c=64 (raw grpc.aio, 6 s, `make run`, demo monitoring): router CPU 0.448 / 0.465 / "
        "0.439 / 0.450 of the gateway's in the same run, Redis 0.051 / 0.054 / 0.054 / 0.049; whole mesh 1.771 "
        "/ 1.775 / 1.754 / 1.768",
        "router 0.402 / 0.401 / 0.417 / 0.420, Redis 0.066 / 0.071 / 0.074 / 0.086; whole mesh 1.735 / 1.753 / "
        "1.759 / 1.801",
        "before, after, before, after, two runs each, the mesh restarted with each writer: the router spends ~9"
        " % less (40 records written for 11-18 µs of router CPU each instead of 42-50 µs, in-process "
        "micro-benchmark), Redis about half of that more; the mesh as a whole within noise",
    ),
    (
        "a traffic split without `sticky_input` draws one version per gateway batch instead of one per request "
        "(each request's chance of each version is unchanged); mirrored calls linger 100 ms instead of 20 ms "
        "(`ROUTER_MIRROR_LINGER_MS`)",
        "scenario 13 at c=64, mesh CPU per request vs none of the machinery (in gateway units): monitoring "
        "1.04, shadow 1.10, guarded 90/10 canary 1.10, everything 1.13",
        "monitoring 1.04 / 1.04, shadow 1.04 / 1.06, guarded canary 1.03 / 1.05, everything 1.07 / 1.07",
        "after, before, after (`make bench BENCH_ARGS='--scenarios rollouts'`, the prediction log change in "
        "both afters): with draws per request nearly every gateway batch of ~20 requests held a canary request "
        "and became two model calls; a shadow made ~30 mirrored calls a second (v1: 68 model calls a second at "
        "c=64), each costing several times its forward pass. Throughput ratios moved by more than this between "
        "runs (0.68-1.01) and are not the measure",
    ),
)
FIXED_DEFECTS = (
    "Overload at 3x capacity: accepted requests waited 5-8 s in gRPC core's backlog of calls the saturated event "
    "loop had not picked up (default 1000 soft / 3000 hard), and core refused the overflow as CANCELLED. Fix: "
    "the gateway bounds that backlog (`max_pending_rpcs` = `max_inflight`, hard limit twice that), its gRPC "
    "concurrency (`max_concurrent_rpcs` = `max_inflight` + 32) and `max_inflight` (512 → 256). The overflow is still "
    "refused by gRPC core with CANCELLED (before any Python runs; gRPC offers no other status there), now "
    "counted as shed.",
    "Feature service answered UNAVAILABLE while Redis was healthy when more than the Redis pool's connections "
    "were in use (MaxConnectionsError at c=128). Fix: a bounded blocking pool (`redis_max_connections`, 64) "
    "that waits up to `redis_timeout_s` for a connection.",
    "Slow replica: choosing by in-flight calls alone sent 48.5 % of calls to a replica 25 ms slower at c=1. "
    "Fix: power of two choices on peak-EWMA latency x (in-flight + 1); the quick rerun sent 2.6 % there.",
    "Batching window: a 200 µs `max_queue_delay_us` cost ~1.3 ms per request (asyncio timers round up to "
    "1 ms). Fix: the demo `fraud` model batches naturally (delay 0); documented in README.",
    "Feature store outage: once Redis answered again, the router's open circuit breaker kept short-circuiting "
    "reads until its next probe, up to 1 s later (recovery 0.06-0.69 s; up to 341 `reject` requests failed and "
    "245 `default` ones were answered from defaults after Redis was back). Fix: the breaker probes every 0.25 s "
    "(`ROUTER_FEATURE_BREAKER_OPEN_S`; recovery 0.13-0.19 s in the reruns), and the scenario counts only a tail "
    "longer than one open interval (plus 0.25 s) as a defect. A 3 s stall: policy `default` p99 126 ms after (121 "
    "ms before), 0 failed.",
)


def console_summary(data: dict[str, Any]) -> str:
    """Defects and each scenario's table, for the terminal at the end of a run."""
    text = markdown(data, plot_path=None, full=True)
    return "## Defects seen" + text.split("## Defects seen", 1)[1].split("## Reproduce", 1)[0]


def summary_markdown(data: dict[str, Any]) -> str:
    """Everything of one run, every run of every scenario included (written next to results.json)."""
    text = markdown(data, plot_path="latency_vs_throughput.png", full=True)
    lines = [text, "## Every run", ""]
    for scenario in data["scenarios"]:
        lines += [f"### {scenario['title']}", "", *runs_table(scenario), ""]
    return "\n".join(lines)


# Plot ------------------------------------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = data["scenarios"]
    if not scenarios:
        return None
    columns = 2
    rows = math.ceil(len(scenarios) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(scenarios) :]:
        ax.set_visible(False)
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        if scenario["name"] in SWEEPS or scenario["name"] == "overload":
            _plot_sweep(ax, scenario)
        elif scenario["name"] == "malformed":
            _plot_malformed(ax, scenario)
        else:
            _plot_timeline(ax, scenario)
        ax.set_title(scenario["title"], fontsize=11)
    figure.suptitle(f"infermesh · {machine_line(data['machine'])[:110]}", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _plot_sweep(ax: Any, scenario: dict[str, Any]) -> None:
    series: dict[str, list[dict[str, Any]]] = {}
    for run in scenario["runs"]:
        if run["mode"] == "closed" or scenario["name"] == "overload":
            series.setdefault(run["series"], []).append(run)
    colors = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"])
    for name, runs in series.items():
        runs.sort(key=lambda r: r["throughput_rps"])
        color = next(colors)
        x = [r["throughput_rps"] for r in runs]
        p50 = [r["latency_ms"]["p50"] for r in runs]
        p99 = [r["latency_ms"]["p99"] for r in runs]
        ax.plot(x, p99, "o-", color=color, label=f"{name} p99")
        ax.plot(x, p50, "o--", color=color, alpha=0.6, label=f"{name} p50")
        for r, y in zip(runs, p99, strict=True):
            if "concurrency" in r:
                ax.annotate(f"c={r['concurrency']}", (r["throughput_rps"], y), fontsize=6, alpha=0.7)
    opened = [r for r in scenario["runs"] if r["mode"] == "open" and scenario["name"] != "overload"]
    for k, run in enumerate(opened):
        label = "open loop (Poisson) p99" if k == 0 else None
        ax.plot(run["throughput_rps"], run["latency_ms"]["p99"], "x", color="black", markersize=8, label=label)
    ax.set_xlabel("throughput (successful req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if len(series) > 3 else 7, ncol=2 if len(series) > 3 else 1)


def _plot_malformed(ax: Any, scenario: dict[str, Any]) -> None:
    summary = scenario["summary"]
    rows = summary["rows"]
    x = range(len(rows))
    ax.bar([k - 0.2 for k in x], [r["cpu_per_rejection_ms"] or 0.0 for r in rows], 0.4, label="gateway CPU ms")
    ax.bar([k + 0.2 for k in x], [r["p50_ms"] or 0.0 for r in rows], 0.4, label="client p50 ms")
    ax.axhline(summary["budget_ms"], color="red", linestyle="--", linewidth=0.8, label="CPU budget")
    ax.set_xticks(list(x), [r["kind"] for r in rows], fontsize=7)
    ax.set_ylabel("ms per rejected request")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _plot_timeline(ax: Any, scenario: dict[str, Any]) -> None:
    twin = ax.twinx()
    colors = iter(["C0", "C1", "C2"])
    for name, rows in scenario.get("timelines", {}).items():
        color = next(colors)
        t = [r["t_s"] for r in rows]
        bucket = (t[1] - t[0]) if len(t) > 1 else 1.0
        ax.plot(t, [r["p99_ms"] for r in rows], "-", color=color, label=f"{name} p99 (ms)")
        twin.plot(t, [r["ok"] / bucket for r in rows], ":", color=color, alpha=0.6, label=f"{name} ok/s")
        failed = [(r["t_s"], r["failed"] / bucket) for r in rows if r["failed"]]
        if failed:
            twin.plot(*zip(*failed, strict=True), "x", color="red", label=f"{name} failed/s")
        flagged = [(r["t_s"], r["tagged"] / bucket) for r in rows if r["tagged"]]
        if flagged:
            twin.plot(*zip(*flagged, strict=True), "+", color="purple", label=f"{name} flagged/s")
    for what, at in scenario["summary"].get("events_s", {}).items():
        ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
        ax.text(at, 0.98, f" {what}", transform=ax.get_xaxis_transform(), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("time since the measurement started (s)")
    ax.set_ylabel("p99 latency (ms), per 0.5 s")
    twin.set_ylabel("answers per second")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="upper left")
