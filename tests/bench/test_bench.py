"""Smoke test of the benchmark tooling: the load generator's statistics and output shape, one tiny load against
the session mesh, one tiny scenario end to end with its reports. The figures themselves are not asserted."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from bench import report
from bench.__main__ import options_from, parse_args
from bench.loadgen import Sample, closed_loop, nearest_rank, open_loop, result, status_code, summarize, timeline
from bench.scenarios import SCENARIOS, BenchOptions, Context, run_scenario
from bench.workloads import FraudViaGateway
from demo.mesh import LocalMesh
from tests.e2e.meshes import DEMO_KEY

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
        "machine": {
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
        },
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
    ]
    assert all(r["throughput_rps"] > 0 and r["errors"] == 0 for r in rows)
    # Four hops in sequence cannot be faster than one.
    assert rows[2]["p50_ms"] > rows[0]["p50_ms"]
    summary = soak["summary"]
    assert summary["point"]["throughput_rps"] > 0 and summary["point"]["errors"] == 0
    assert set(summary["growth_pct"]) >= {"gateway", "router", "feature_service"}
    assert all(value > 0 for value in summary["rss_last_mib"].values())
    text = "\n".join(report.targets({"scenarios": [floor, soak]}))
    assert "(floor) empty servers in the mesh's topology, p50 at c=1" in text and "RSS over 1 s at c=64" in text


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
        "soak",
    ]
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "nope"])
