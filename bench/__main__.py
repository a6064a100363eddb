"""`python -m bench` (`make bench`): latency, throughput and fault figures of the local mesh.

Starts the mesh as `make run` does (own ports, own private Redis), runs the chosen scenarios, stops everything
and writes bench/results/<time>/{results.json,summary.md,latency_vs_throughput.png}; a full run of every
scenario also rewrites BENCHMARKS.md and bench/latency_vs_throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench import environment as env
from bench import report
from bench.loadgen import NoProgress, ProgressSink
from bench.scenarios import SCENARIOS, BenchOptions, Context, run_scenario

ROOT = Path(__file__).resolve().parent.parent


class RichProgress:
    """One bar per load run: elapsed of warm-up + window, with live OK / failed counts."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=24),
            TimeRemainingColumn(),
            TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
            console=self.console,
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def begin(self, label: str, total_s: float) -> Any:
        return self.progress.add_task(label, total=total_s, ok=0, failed=0)

    def update(self, handle: Any, elapsed_s: float, ok: int, failed: int) -> None:
        self.progress.update(handle, completed=elapsed_s, ok=ok, failed=failed)

    def end(self, handle: Any) -> None:
        task = self.progress.tasks[handle] if isinstance(handle, int) else None
        if task is not None:
            self.progress.update(handle, completed=task.total)

    def log(self, message: str) -> None:
        self.progress.console.log(message)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        default="all",
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="every scenario, short: under a minute")
    parser.add_argument("--duration", type=float, help="seconds measured per sweep point (default 5; quick 1)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per sweep point (default 1; quick 0.3)")
    parser.add_argument("--concurrency", type=_ints, help="closed-loop sweep, e.g. 1,8,32,128 (the default)")
    parser.add_argument("--fault-duration", type=float, help="seconds of the failover and outage runs (default 24)")
    parser.add_argument("--fault-concurrency", type=int, help="concurrency of the fault runs (default 16)")
    parser.add_argument("--slow-delay-ms", type=float, help="scenario 6: delay per batch of the slow replica (25)")
    parser.add_argument("--p99-budget-ms", type=float, help="scenario 3: p99 budget for the comparison (50)")
    parser.add_argument("--overload-factor", type=float, help="scenario 7: offered load / capacity (3)")
    parser.add_argument("--device", help="scenario 3: model service device: auto, cpu, cuda (default auto)")
    parser.add_argument("--demo-dir", type=Path, default=ROOT / ".run" / "demo", help="built by `make demo`")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    markdown = parser.add_mutually_exclusive_group()
    markdown.add_argument("--write-markdown", action="store_true", help="rewrite BENCHMARKS.md even if partial")
    markdown.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: rewrite the reports (BENCHMARKS.md too, if that run was full) from a saved results.json",
    )
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.scenarios == "all" else [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    args.names = names
    return args


def options_from(args: argparse.Namespace) -> BenchOptions:
    options = BenchOptions.quick_mode() if args.quick else BenchOptions()
    overrides = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "fault_duration_s": args.fault_duration,
        "fault_concurrency": args.fault_concurrency,
        "slow_delay_ms": args.slow_delay_ms,
        "p99_budget_ms": args.p99_budget_ms,
        "overload_factor": args.overload_factor,
        "device": args.device,
    }
    if args.concurrency:
        overrides["feature_concurrency"] = args.concurrency
        overrides["slow_concurrency"] = args.concurrency
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def scenario_timeout_s(options: BenchOptions) -> float:
    """Far above what any scenario takes: past it the scenario is reported as hung."""
    points = max(len(options.concurrency), 2) * 12 + 8
    return 120 + points * (options.duration_s + options.warmup_s) + 4 * options.fault_duration_s


async def run(args: argparse.Namespace, progress: ProgressSink, log) -> dict[str, Any]:
    options = options_from(args)
    started = dt.datetime.now(dt.UTC)
    run_dir = args.results_dir / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (args.demo_dir / "model_repository").is_dir():
        raise SystemExit(f"no demo in {args.demo_dir}: run `make demo` first (make bench does)")
    machine = asyncio.create_task(asyncio.to_thread(env.machine_info))  # probes torch in a child: meanwhile
    data: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": None,
        "options": asdict(options),
        "scenarios": [],
        "crashed": [],
    }
    clock = time.perf_counter()
    ctx = Context(demo_dir=args.demo_dir, run_dir=run_dir / "processes", options=options, progress=progress, log=log)
    try:
        for name in args.names:
            log(f"scenario {SCENARIOS[name][0]}")
            try:
                outcome = await asyncio.wait_for(run_scenario(ctx, name), scenario_timeout_s(options))
            except TimeoutError:
                data["crashed"].append(
                    {"name": name, "error": f"hung: no result in {scenario_timeout_s(options):.0f}s"}
                )
                log(f"[red]scenario {name} hung[/]")
                continue
            except Exception as error:
                data["crashed"].append({"name": name, "error": "".join(traceback.format_exception(error))})
                log(f"[red]scenario {name} failed: {error!r}[/]")
                continue
            data["scenarios"].append(outcome)
            for defect in outcome.get("defects", []):
                log(f"[yellow]defect: {defect}[/]")
    finally:
        await ctx.close()
    data["machine"] = await machine
    # The copies of the model repository (tens of MB each) are not results; the service logs are.
    for copy in sorted((run_dir / "processes").glob("**/model_repository"), reverse=True):
        shutil.rmtree(copy, ignore_errors=True)
    data["seconds"] = round(time.perf_counter() - clock, 1)
    data["run_dir"] = str(run_dir)
    return data


def write(data: dict[str, Any], args: argparse.Namespace, *, full: bool | None = None) -> list[Path]:
    run_dir = Path(data["run_dir"])
    written = [report.write_json(run_dir / "results.json", data)]
    plot = report.plot(data, run_dir / "latency_vs_throughput.png")
    if plot:
        written.append(plot)
    (run_dir / "summary.md").write_text(report.summary_markdown(data))
    written.append(run_dir / "summary.md")
    if full is None:
        full = not args.quick and args.names == list(SCENARIOS) and not data["crashed"]
    if args.write_markdown or (full and not args.no_markdown):
        committed_plot = ROOT / "bench" / "latency_vs_throughput.png"
        if plot:
            shutil.copyfile(plot, committed_plot)
        gpu_path = ROOT / "bench" / "gpu_results.json"
        gpu = json.loads(gpu_path.read_text()) if gpu_path.exists() else None
        text = report.markdown(data, plot_path="bench/latency_vs_throughput.png" if plot else None, full=full, gpu=gpu)
        (ROOT / "BENCHMARKS.md").write_text(text)
        written += [ROOT / "BENCHMARKS.md", committed_plot]
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        data["run_dir"] = str(args.render.parent)
        full = not data["options"]["quick"] and [s["name"] for s in data["scenarios"]] == list(SCENARIOS)
        for path in write(data, args, full=full and not data["crashed"]):
            print(f"wrote {path}")
        return 0
    try:  # the same event loop as the services: the generator's own CPU cost is part of every figure
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.no_progress:
        progress: ProgressSink = NoProgress()

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        data = asyncio.run(run(args, progress, log))
    else:
        with RichProgress() as bar:
            data = asyncio.run(run(args, bar, bar.log))
    for path in write(data, args):
        print(f"wrote {path}")
    print()
    print(report.console_summary(data))
    for crash in data["crashed"]:
        print(f"scenario {crash['name']} did not finish:\n{crash['error']}", file=sys.stderr)
    return 1 if data["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
