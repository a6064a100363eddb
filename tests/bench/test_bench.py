"""Smoke test of the benchmark tooling: the load generator's statistics and output shape, one tiny load against
the session mesh, one tiny scenario end to end with its reports. The figures themselves are not asserted."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.aio as aioclient
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from bench import environment as env
from bench import report
from bench.__main__ import options_from, parse_args
from bench.loadgen import Sample, closed_loop, nearest_rank, open_loop, result, status_code, summarize, timeline
from bench.scenarios import SCENARIOS, BenchOptions, Context, run_scenario
from bench.workloads import FraudViaGateway, malformed_requests, retry_delay_s
from demo.mesh import LocalMesh
from tests.e2e.meshes import DEMO_KEY, FLOOD_KEY, metric

RUN_KEYS = {"label", "mode", "duration_s", "warmup_s", "requests", "ok", "errors", "tags", "throughput_rps"}
PERCENTILE_KEYS = {"p50", "p90", "p95", "p99", "mean", "max"}


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert [nearest_rank(values, p) for p in (50, 90, 95, 99, 100)] == [50, 90, 95, 99, 100]
    assert nearest_rank([7.0], 99) == 7.0
    assert nearest_rank([1, 2, 3, 4], 50) == 2  # ceil(0.5 * 4) = 2nd smallest, no interpolation


def test_summary_counts_codes_and_tags_and_excludes_failures_from_latency() -> None:
    samples = [Sample(0.0, 0.010, "OK"), Sample(0.1, 0.120, "OK", "defaulted"), Sample(0.2, 5.0, "UNAVAILABLE")]
    summary = summarize(samples, (0.0, 1.0))
    assert summary["requests"] == 3 and summary["ok"] == 2
    assert summary["errors"] == {"UNAVAILABLE": 1}
    assert summary["tags"] == {"defaulted": 1}
    assert summary["throughput_rps"] == 2.0
    assert summary["latency_ms"]["p99"] == pytest.approx(20.0)  # the failure's 4.8 s is not a latency


def test_status_codes_of_both_clients() -> None:
    assert status_code(InferenceServerException("x", status="StatusCode.RESOURCE_EXHAUSTED")) == "RESOURCE_EXHAUSTED"
    assert status_code(TimeoutError()) == "CLIENT_TIMEOUT"
    assert status_code(ValueError("boom")) == "CLIENT_ValueError"


async def test_loops_count_every_request_by_outcome() -> None:
    async def send(i: int) -> str | None:
        await asyncio.sleep(0.002)
        if i % 5 == 4:
            raise InferenceServerException("busy", status="StatusCode.RESOURCE_EXHAUSTED")
        return "defaulted" if i % 5 == 0 else None

    closed = result(await closed_loop(send, 4, duration_s=0.3, warmup_s=0.05, label="fake"))
    assert closed.keys() >= RUN_KEYS and set(closed["latency_ms"]) == PERCENTILE_KEYS
    assert closed["concurrency"] == 4
    assert closed["requests"] == closed["ok"] + closed["errors"]["RESOURCE_EXHAUSTED"]
    assert closed["tags"]["defaulted"] > 0
    assert closed["error_examples"] == {"RESOURCE_EXHAUSTED": ["busy"]}
    opened = await open_loop(send, 200.0, duration_s=0.3, warmup_s=0.05, seed=1)
    summary = result(opened)
    assert summary["mode"] == "open" and summary["offered_rps"] > 0 and summary["client_dropped"] == 0
    assert sum(row["ok"] + row["failed"] for row in timeline(opened, 0.1)) == summary["requests"]


async def test_load_generator_against_the_mesh(mesh: LocalMesh) -> None:
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        send = FraudViaGateway(client, DEMO_KEY)
        closed = result(await closed_loop(send, 4, duration_s=0.8, warmup_s=0.2))
        opened = result(await open_loop(send, 40.0, duration_s=0.8, warmup_s=0.2))
    for run in (closed, opened):
        assert run["errors"] == {}, run.get("error_examples")
        assert run["ok"] > 0 and run["throughput_rps"] > 0
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    # The client must never have loaded the mesh's own OIP stubs next to tritonclient's.
    assert "infermesh.proto.inference_pb2" not in sys.modules


async def test_overhead_scenario_and_reports(mesh: LocalMesh, demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(duration_s=0.4, warmup_s=0.1, concurrency=(1, 4), mesh_warmup_s=0.0)
    ctx = Context(demo_dir=demo_dir, run_dir=tmp_path, options=options, api_key=DEMO_KEY, shared_mesh=mesh)
    outcome = await run_scenario(ctx, "overhead")
    await ctx.close()  # leaves the given mesh running
    assert mesh.gateway is not None and mesh.gateway.alive
    assert outcome["name"] == "overhead" and outcome["defects"] == []
    assert len(outcome["runs"]) == 2 * len(options.concurrency) + 2  # both paths at each concurrency + open loop
    assert all(run["errors"] == {} for run in outcome["runs"])
    rows = outcome["summary"]["rows"]
    assert [row["load"] for row in rows[:2]] == ["c=1", "c=4"] and rows[2]["load"].endswith("open")
    assert {"direct", "gateway", "added_p50_ms", "added_p99_ms"} <= rows[0].keys()

    data = {
        "started": "now",
        "seconds": 1.0,
        "machine": _MACHINE,
        "options": {"warmup_s": 0.1, "duration_s": 0.4},
        "scenarios": [outcome],
    }
    saved = json.loads(report.write_json(tmp_path / "results.json", data).read_text())
    assert saved["scenarios"][0]["summary"]["rows"][0]["load"] == "c=1"
    text = report.markdown(data, plot_path=None, full=False)
    assert "## 1. Mesh overhead" in text and "No CUDA GPU" in text
    assert "| `fraud` via gateway, p50 at c=1 | ≤ 2.5 ms |" in text
    assert report.plot(data, tmp_path / "plot.png").stat().st_size > 0


async def test_floor_and_soak_scenarios(mesh: LocalMesh, demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(duration_s=0.3, warmup_s=0.1, concurrency=(1, 4), mesh_warmup_s=0.0, soak_s=1.0)
    ctx = Context(demo_dir=demo_dir, run_dir=tmp_path, options=options, api_key=DEMO_KEY, shared_mesh=mesh)
    floor = await run_scenario(ctx, "floor")
    soak = await run_scenario(ctx, "soak")
    await ctx.close()
    assert floor["defects"] == [] and soak["defects"] == []
    rows = floor["summary"]["rows"]
    assert [(r["series"], r["concurrency"]) for r in rows] == [
        ("one hop", 1),
        ("one hop", 4),
        ("mesh topology", 1),
        ("mesh topology", 4),
        ("mesh topology, hop streams", 1),
        ("mesh topology, hop streams", 4),
    ]
    assert all(r["throughput_rps"] > 0 and r["errors"] == 0 for r in rows)
    # Four hops in sequence cannot be faster than one, whichever way the internal ones travel.
    assert rows[2]["p50_ms"] > rows[0]["p50_ms"] and rows[4]["p50_ms"] > rows[0]["p50_ms"]
    summary = soak["summary"]
    assert summary["point"]["throughput_rps"] > 0 and summary["point"]["errors"] == 0
    assert set(summary["growth_pct"]) >= {"gateway", "router", "feature_service"}
    assert all(value > 0 for value in summary["rss_last_mib"].values())
    text = "\n".join(report.targets({"scenarios": [floor, soak]}))
    assert "(floor) empty servers in the mesh's topology, unary calls, p50 at c=1" in text
    assert "(floor) empty servers in the mesh's topology, hop streams, p50 at c=1" in text
    assert "RSS over 1 s at c=64" in text


async def test_http_scenario(mesh: LocalMesh, demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(duration_s=0.3, warmup_s=0.1, concurrency=(1, 4), mesh_warmup_s=0.0)
    ctx = Context(demo_dir=demo_dir, run_dir=tmp_path, options=options, api_key=DEMO_KEY, shared_mesh=mesh)
    outcome = await run_scenario(ctx, "http")
    await ctx.close()
    assert outcome["defects"] == []
    rows = outcome["summary"]["rows"]
    series = ["gRPC", "HTTP/REST, JSON", "HTTP/REST, binary tensors"]
    assert [(r["series"], r["concurrency"]) for r in rows] == [(s, c) for c in (1, 4) for s in series]
    assert all(r["throughput_rps"] > 0 and r["errors"] == 0 for r in rows)
    text = "\n".join(report.RENDER["http"](outcome))
    assert "| HTTP/REST, binary tensors | c=4 |" in text


def test_malformed_requests_are_just_under_the_limit_and_malformed_as_declared() -> None:
    limit = 16 * 1024 * 1024
    requests = {r.kind: r for r in malformed_requests(limit)}
    assert list(requests) == ["count mismatch", "shape overflow", "batch over max", "reference: small"]
    for kind, request in requests.items():
        size = len(request.payload)
        if kind.startswith("reference"):
            assert size <= 1024
        else:
            assert limit - 128 * 1024 < size < limit, kind
    parsed = {kind: service_pb2.ModelInferRequest.FromString(r.payload) for kind, r in requests.items()}
    mismatch = parsed["count mismatch"]
    assert [list(t.shape) for t in mismatch.inputs] == [[1], [1], [1]]
    assert len(mismatch.raw_input_contents[0]) > 3_000_000 * 5  # millions of elements for a declared one
    assert list(parsed["shape overflow"].inputs[0].shape) == [2**62, 2**62, 1]
    assert all(list(t.shape) == [4_000_000] for t in parsed["batch over max"].inputs)


def test_retry_hint_and_cpu_parsing() -> None:
    delay = Duration()
    delay.FromMilliseconds(20)
    detail = status_pb2.Status(code=8, message="over quota")
    detail.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    trailers = (("other", "x"), ("grpc-status-details-bin", detail.SerializeToString()))
    assert retry_delay_s(trailers) == pytest.approx(0.02)
    assert retry_delay_s((("grpc-status-details-bin", status_pb2.Status(code=8).SerializeToString()),)) is None
    assert retry_delay_s(None) is None
    line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 317 25 0 0 20 0 3 0 1000 2000 300"
    assert env.cpu_ticks(line) == (317, 25)
    user, system = env.cpu_times(os.getpid())
    assert user > 0 and system >= 0 and env.cpu_seconds(os.getpid()) >= user


async def test_tenants_and_malformed_scenarios(mesh: LocalMesh, demo_dir: Path, tmp_path: Path) -> None:
    # The session mesh's tenants: "demo" (no quota) plays calm, "flood" has the quota the scenario reads.
    assert "flood" in mesh.options.tenants
    options = BenchOptions(duration_s=0.4, warmup_s=0.1, mesh_warmup_s=0.0, calm_concurrency=4, malformed_requests=2)
    ctx = Context(
        demo_dir=demo_dir,
        run_dir=tmp_path,
        options=options,
        api_key=DEMO_KEY,
        tenant_keys={"calm": DEMO_KEY, "flood": FLOOD_KEY},
        shared_mesh=mesh,
    )
    tenants = await run_scenario(ctx, "tenants")
    malformed = await run_scenario(ctx, "malformed")
    await ctx.close()
    assert mesh.gateway is not None and mesh.gateway.alive
    assert tenants["defects"] == []
    summary = tenants["summary"]
    assert set(summary["calm"]) == {"calm alone", "calm with the flood"}
    assert all(p["errors"] == 0 and p["throughput_rps"] > 0 for p in summary["calm"].values())
    for flood in summary["flood"].values():
        assert flood["refused"] > 0 and flood["other_errors"] == {}
        assert flood["accepted_whole_run"] <= flood["quota_allows_whole_run"] + 1
    assert summary["retry_hints"]["with_hint"] == summary["retry_hints"]["refusals"] > 0
    rows = malformed["summary"]["rows"]
    assert [r["kind"] for r in rows] == ["count mismatch", "shape overflow", "batch over max", "reference: small"]
    # The figures themselves are not asserted (CPU time comes in 10 ms ticks); what the gateway answered is.
    assert all(r["codes"] == {"INVALID_ARGUMENT": 2} for r in rows), [r["codes"] for r in rows]
    assert all(r["cpu_per_rejection_ms"] is not None and r["p50_ms"] > 0 for r in rows)
    data = {"scenarios": [tenants, malformed]}
    text = "\n".join(report.targets(data))
    assert "a tenant past its quota refused" in text and "rejecting a 16 MiB malformed request, gateway CPU" in text
    for scenario in (tenants, malformed):
        assert report.RENDER[scenario["name"]](scenario)
    assert report.plot({**data, "machine": _MACHINE}, tmp_path / "plot.png").stat().st_size > 0


_MACHINE = {
    "nproc": 2,
    "cpu": "test",
    "memory_gib": 1,
    "os": "Linux",
    "python": "3.11",
    "torch": "x",
    "grpcio": "x",
    "tritonclient": "x",
    "redis_server": "Redis server v=7",
    "cuda": False,
    "gpu": None,
}


async def test_model_changes_scenario(demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(fault_duration_s=4.0, warmup_s=0.1, mesh_warmup_s=0.0, model_change_concurrency=4)
    ctx = Context(demo_dir, tmp_path, options)
    outcome = await run_scenario(ctx, "models")
    summary = outcome["summary"]
    assert outcome["defects"] == [] and summary["failed"] == 0 and summary["requests"] > 0
    assert [c["what"] for c in summary["changes"]] == [
        "config: version 2 in, 1 out",
        "config: version 1 only",
        "config: versions 1 and 2",
        "load: the folder's config (1 only)",
    ]
    assert all(c["load_s"] > 0 for c in summary["changes"])
    assert "**Failed requests: 0**" in "\n".join(report.RENDER["models"](outcome))


async def test_redis_stall_scenario(demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(fault_duration_s=4.5, stall_s=1.5, warmup_s=0.1, mesh_warmup_s=0.0, fault_concurrency=4)
    ctx = Context(demo_dir, tmp_path, options)
    try:
        outcome = await run_scenario(ctx, "stall")
    finally:
        await ctx.close()
    default = outcome["summary"]["policies"]["default"]["phases"]
    assert default["stall"]["requests"] > 0 and default["stall"]["errors"] == {}
    assert default["stall"]["tags"].get("features_unavailable", 0) > 0  # answered from the defaults, flagged
    reject = outcome["summary"]["policies"]["reject"]["phases"]
    assert reject["stall"]["errors"].get("UNAVAILABLE", 0) > 0
    assert "Policy `default` during the stall: 0 failed" in "\n".join(report.RENDER["stall"](outcome))


async def test_rollouts_scenario(demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(duration_s=0.5, warmup_s=0.1, mesh_warmup_s=0.0, concurrency=(1, 4))
    ctx = Context(demo_dir, tmp_path, options)
    try:
        outcome = await run_scenario(ctx, "rollouts")
        mesh = ctx.shared_mesh
        assert mesh is not None and mesh.router is not None
        mirrored = metric(mesh.router.metrics_port, "infermesh_shadow_compared_rows_total", 'version="2"')
    finally:
        await ctx.close()
    rows = outcome["summary"]["rows"]
    assert outcome["defects"] == [] and len(rows) == 10 and all(r["throughput_rps"] > 0 for r in rows)
    # Every process's CPU in units of the gateway's: more than the gateway alone, and 1.0 against itself for none.
    assert all(r["cpu_in_gateway_units"] > 1 for r in rows)
    assert {r["cpu_vs_none"] for r in rows if r["setup"].startswith("none")} == {1.0}
    assert mirrored > 0  # the shadow and the canary's comparisons really ran
    text = "\n".join(report.RENDER["rollouts"](outcome)) + "\n".join(report.targets({"scenarios": [outcome]}))
    assert "shadowing, guards, drift windows and prediction logging together at c=4" in text


async def test_priority_mix_scenario(demo_dir: Path, tmp_path: Path) -> None:
    options = BenchOptions(duration_s=0.8, warmup_s=0.1, mesh_warmup_s=0.0, priority_concurrency=(2, 24))
    ctx = Context(demo_dir, tmp_path, options)
    outcome = await run_scenario(ctx, "priorities")
    rows = outcome["summary"]["rows"]
    assert outcome["defects"] == [] and len(rows) == 4 and all(r["throughput_rps"] > 0 for r in rows)
    assert {(r["mix"], r["group"]) for r in rows} >= {("priority 1 among default", "high")}
    assert "| priority 1 among default | high |" in "\n".join(report.RENDER["priorities"](outcome))


def test_cli_options() -> None:
    args = parse_args(["--quick", "--scenarios", "overhead,failover", "--concurrency", "2,4"])
    assert args.names == ["overhead", "failover"]
    options = options_from(args)
    assert options.quick and options.concurrency == (2, 4) and options.slow_concurrency == (2, 4)
    assert list(SCENARIOS) == [
        "floor",
        "overhead",
        "features",
        "batching",
        "failover",
        "outage",
        "slow",
        "overload",
        "tenants",
        "malformed",
        "soak",
        "models",
        "stall",
        "rollouts",
        "priorities",
        "http",
    ]
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "nope"])
