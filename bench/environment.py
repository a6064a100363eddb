"""What the scenarios run against: the local mesh (as `make run` starts it), single services, bench-only
model repository variants and feature views, and the measurements taken from outside the processes
(RSS from /proc, Prometheus counters, a description of the machine)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from demo.mesh import ApiKey, LocalMesh, MeshOptions
from demo.processes import ServiceProcess
from demo.redis_server import redis_binary
from demo.seed import demo_views

BENCH_TENANT = "bench"
FLOOD_TENANT = "flood"  # scenario 8: the tenant with a quota (the mesh's key file gives it one)
WIDE_POPULATION = 10_000  # entities e0…e9999 in the bench feature views
WIDE_VIEWS = {"bench10": 10, "bench50": 50}


# Model repositories ---------------------------------------------------------------------------------------


def bench_repository(demo_dir: Path, target: Path, *, bench_mlp_batching: bool = True) -> Path:
    """Copy of the demo repository plus `fraud_strict` (on_missing=reject); optionally bench_mlp unbatched."""
    repository = target / "model_repository"
    if repository.exists():
        shutil.rmtree(repository)
    shutil.copytree(demo_dir / "model_repository", repository, ignore=shutil.ignore_patterns(".*"))
    fraud = json.loads((repository / "fraud" / "config.json").read_text())
    strict = repository / "fraud_strict"
    shutil.copytree(repository / "fraud", strict)
    fraud["name"] = "fraud_strict"
    fraud["feature_spec"]["on_missing"] = "reject"
    (strict / "config.json").write_text(json.dumps(fraud, indent=2) + "\n")
    if not bench_mlp_batching:
        path = repository / "bench_mlp" / "config.json"
        config = json.loads(path.read_text())
        config.setdefault("dynamic_batching", {})["enabled"] = False
        path.write_text(json.dumps(config, indent=2) + "\n")
    return repository


def bench_mlp_settings(repository: Path) -> dict[str, Any]:
    return json.loads((repository / "bench_mlp" / "config.json").read_text())


# The mesh ------------------------------------------------------------------------------------------------


def start_mesh(
    demo_dir: Path,
    run_dir: Path,
    api_key: str,
    *,
    repository: Path | None = None,
    tenant_keys: Mapping[str, str] | None = None,
    **options: Any,
) -> LocalMesh:
    """The whole mesh as `make run` starts it (private Redis on a free port, free service ports). `api_key`
    is the bench tenant's (every model, no quota, admin); `tenant_keys` ({tenant: key}) add tenants allowed `fraud`,
    whose quotas, if any, come in `tenants=`."""
    repository = repository or bench_repository(demo_dir, run_dir)
    keys = [ApiKey(api_key, BENCH_TENANT, ["*"], role="admin")]  # admin: scenario 11 changes models
    keys += [ApiKey(key, tenant, ["fraud"]) for tenant, key in (tenant_keys or {}).items()]
    gateway = {"http_port": 0, **options.pop("gateway", {})}  # the HTTP/REST front too, on a free port
    # The prediction log (and label feedback) on the mesh's Redis, as `make run` has it, except on a Redis Cluster.
    options.setdefault("prediction_log", not options.get("redis_cluster_shards"))
    mesh_options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=keys,
        model_repository=repository,
        gateway=gateway,
        **options,
    )
    return LocalMesh(mesh_options).start()


def stop_all(processes: list[ServiceProcess]) -> list[int | None]:
    """SIGTERM every process at once and wait for all (a mesh stops in one grace period, not five)."""
    if not processes:
        return []
    with ThreadPoolExecutor(max_workers=len(processes)) as pool:
        return list(pool.map(lambda process: process.stop(), processes))


def stop_mesh(mesh: LocalMesh) -> None:
    stop_all(mesh.processes())
    if mesh.redis is not None:
        mesh.redis.stop()


def start_service(module: str, name: str, run_dir: Path, settings: dict[str, Any]) -> ServiceProcess:
    process = ServiceProcess(module, name, run_dir, settings)
    process.start()
    return process


async def wait_ready(*processes: ServiceProcess, timeout_s: float = 120.0) -> None:
    await asyncio.gather(*(asyncio.to_thread(p.wait_ready, timeout_s) for p in processes))


# Bench feature views -------------------------------------------------------------------------------------


def wide_views() -> dict[str, Any]:
    """The demo views plus `bench10` and `bench50` (10 and 50 FP32 features, entities e0…e9999)."""
    views = demo_views()
    for name, width in WIDE_VIEWS.items():
        views["views"].append(  # type: ignore[union-attr]
            {
                "name": name,
                "entity_key": "entity_id",
                "max_age_ms": 0,
                "features": [{"name": f"f{k}", "default": 0.0} for k in range(width)],
            }
        )
    return views


def wide_feature_names(view: str) -> list[str]:
    return [f"f{k}" for k in range(WIDE_VIEWS[view])]


def write_wide_views(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wide_views(), indent=2) + "\n")
    return path


async def seed_wide_views(redis_url: str, views_path: Path, *, population: int = WIDE_POPULATION) -> int:
    """Write every entity of the bench views (random values, event time now) through FeatureStore.write."""
    import time

    from feature_service.store import FeatureStore
    from feature_service.views import load_views

    store = await FeatureStore.open(redis_url, load_views(views_path))  # one Redis or a cluster
    rng = np.random.default_rng(7)
    now_ms = time.time_ns() // 1_000_000
    written = 0
    try:
        await store.load_scripts()
        for view, width in WIDE_VIEWS.items():
            names = wide_feature_names(view)
            values = rng.random((population, width), dtype=np.float32).tolist()
            rows = [(f"e{k}", dict(zip(names, values[k], strict=True)), now_ms) for k in range(population)]
            for start in range(0, population, 2_000):
                written += (await store.write(view, rows[start : start + 2_000])).written
    finally:
        await store.aclose()
    return written


# Measurements from outside -------------------------------------------------------------------------------


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak over the process's life) from /proc/<pid>/status, in MiB."""
    found: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def cpu_ticks(stat: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks, every thread of the process (live or exited), from a /proc/<pid>/stat
    line. Fields are counted after the command name's closing parenthesis (the name may hold spaces or ')')."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5); fields[0] is field 3, the state


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds the process has used so far; resolution one clock tick (10 ms at 100 Hz)."""
    user, system = cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, in seconds."""
    return sum(cpu_times(pid))


def mesh_pids(mesh: LocalMesh) -> dict[str, int]:
    pids = {p.name: p.process.pid for p in mesh.processes() if p.process is not None and p.alive}
    if mesh.redis is not None and mesh.redis.process is not None:
        pids["redis"] = mesh.redis.process.pid
    return pids


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include all of `labels`."""
    total = 0.0
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(w in head for w in wanted):
                total += float(value)
    return total


async def served_infers(process: ServiceProcess) -> float:
    """ModelInfer calls a model service replica answered, from its Prometheus counter."""
    try:
        text = await asyncio.to_thread(scrape, process.metrics_port)
    except OSError:
        return float("nan")
    return metric_sum(text, "infermesh_requests_total", method="ModelInfer", code="OK")


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def _redis_version() -> str:
    try:
        return _first_line([redis_binary(), "--version"])
    except (RuntimeError, ImportError):
        return "no redis-server"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cuda_available() -> bool:
    """Asked in a child process: the bench process itself never imports torch."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120, check=False).returncode == 0


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    cuda = cuda_available()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
        "tritonclient": _version("tritonclient"),
        "redis_server": _redis_version(),
        "cuda": cuda,
        "gpu": _first_line(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if cuda else None,
    }
