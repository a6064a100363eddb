"""`make run` supervises its services: a service SIGKILLed under load is restarted, and no request fails
meanwhile. One of two model replicas: the router retries on the other. The only router: the gateway holds
requests until the restarted router is reachable. Through the real entry point, `python -m demo.run`, as a
user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import tritonclient.grpc.aio as aioclient

from tests.e2e.meshes import fraud_inputs

KEY = "test-supervised-key-0123456789"


def read_lines(process: subprocess.Popen[str], lines: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip())


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # poll the run's output and port files


@dataclass
class Run:
    process: subprocess.Popen[str]
    run_dir: Path
    lines: list[str]


@pytest.fixture
def make_run(demo_dir: Path, tmp_path: Path) -> Iterator[Run]:
    """`python -m demo.run` (what `make run` runs) on free ports, its output collected; Ctrl-C at the end."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "demo.run", "--demo-dir", str(demo_dir), "--run-dir", str(run_dir), "--port", "0"]
    command += ["--http-port", "0"]
    env = {**os.environ, "INFERMESH_DEMO_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = Run(process, run_dir, [])
    threading.Thread(target=read_lines, args=(process, run.lines), daemon=True).start()
    yield run
    process.send_signal(signal.SIGINT)  # Ctrl-C stops everything
    try:
        assert process.wait(60) == 0, run.lines[-20:]
    finally:
        if process.poll() is None:
            process.kill()


async def started(run: Run) -> str:
    """The gateway's gRPC address, once `make run` says it serves."""
    await wait_until(lambda: any("serving the Open Inference Protocol on" in line for line in run.lines), "make run")
    banner = re.search(r"on (\S+)", next(line for line in run.lines if "serving the Open" in line))
    assert banner is not None
    return banner.group(1)


def service_pid(run: Run, service: str) -> int:
    pid: int = json.loads((run.run_dir / f"{service}.port.json").read_text())["pid"]
    return pid


def private_redis(run: Run) -> redis.Redis:
    """A client of make run's private Redis, at the address its banner prints, with its password file."""
    line = next(line for line in run.lines if "redis: redis://" in line)
    port = re.search(r"redis://127\.0\.0\.1:(\d+)/", line)
    assert port is not None
    password = (run.run_dir / "redis" / "password").read_text().strip()
    return redis.Redis(host="127.0.0.1", port=int(port.group(1)), password=password, socket_timeout=5)


def redis_pid(run: Run) -> int:
    with private_redis(run) as client:
        return int(client.info("server")["process_id"])


async def kill_under_load(run: Run, endpoint: str, service: str, pid: Callable[[], int]) -> tuple[int, int]:
    """SIGKILL `service` while 8 clients send `fraud` without pause; wait for its restart and 100 answers after
    it. (pid killed, pid restarted); asserts that no request failed."""
    killed_pid = pid()
    ok, failed, stop = [0], [], asyncio.Event()

    async with aioclient.InferenceServerClient(endpoint) as client:

        async def load() -> None:
            while not stop.is_set():
                try:
                    await client.infer(
                        "fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers={"authorization": f"Bearer {KEY}"}
                    )
                    ok[0] += 1
                except Exception as error:  # every failure is what this test looks for
                    failed.append(repr(error))

        workers = [asyncio.create_task(load()) for _ in range(8)]
        await wait_until(lambda: ok[0] >= 100, "load before the kill")
        os.kill(killed_pid, signal.SIGKILL)
        await wait_until(lambda: any(f"{service} restarted" in line for line in run.lines), "the restart")
        restarted_pid = pid()
        before = ok[0]
        await wait_until(lambda: ok[0] >= before + 100, "load after the restart")
        stop.set()
        await asyncio.gather(*workers)
    assert failed == [], failed[:5]
    assert any(f"{service} exited" in line and "restarting in" in line for line in run.lines), run.lines[-20:]
    return killed_pid, restarted_pid


async def test_a_killed_replica_is_restarted_and_no_request_fails(make_run: Run) -> None:
    endpoint = await started(make_run)
    # The HTTP/REST front `make run` turns on, at the address its banner prints.
    http = re.search(
        r"over HTTP/REST .* on (http://[\d.]+:\d+):\s*$", next(line for line in make_run.lines if "HTTP/REST" in line)
    )
    assert http is not None
    live = await asyncio.to_thread(urllib.request.urlopen, f"{http.group(1)}/v2/health/live", timeout=10)
    assert live.status == 200
    killed, restarted = await kill_under_load(
        make_run, endpoint, "model_service_0", lambda: service_pid(make_run, "model_service_0")
    )
    assert restarted != killed


async def test_the_only_router_killed_costs_latency_not_failures(make_run: Run) -> None:
    """While the router restarts, the gateway finds no router; it holds the requests (GATEWAY_ROUTER_UNREACHABLE_
    WAIT_S, within their deadlines) and sends them once the restarted router accepts connections."""
    endpoint = await started(make_run)
    killed, restarted = await kill_under_load(make_run, endpoint, "router", lambda: service_pid(make_run, "router"))
    assert restarted != killed


async def test_a_killed_redis_is_restarted_with_its_data_and_no_request_fails(make_run: Run) -> None:
    """Meanwhile `fraud` answers from its feature defaults (its `default` policy); the restarted redis-server
    loads its append-only file, so the features written before the kill are there again."""
    endpoint = await started(make_run)
    with private_redis(make_run) as client:
        keys_before = client.dbsize()
        assert keys_before > 1000  # the demo's features
    killed, restarted = await kill_under_load(make_run, endpoint, "redis", lambda: redis_pid(make_run))
    assert restarted != killed
    with private_redis(make_run) as client:
        assert client.dbsize() >= keys_before
