"""Start infermesh services as real processes and wait until they are ready (used by run, tests, bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.tls import ClientTls

ENV_PREFIX = {
    "gateway": "GATEWAY_",
    "router": "ROUTER_",
    "feature_service": "FEATURE_SERVICE_",
    "model_service": "MODEL_SERVICE_",
}


class ServiceProcess:
    """`python -m <module>` with settings from env; ports reported through a port file."""

    def __init__(self, module: str, name: str, run_dir: Path, settings: dict[str, object]) -> None:
        self.module = module
        self.name = name
        self.run_dir = run_dir
        self.settings = settings
        self.port_file = run_dir / f"{name}.port.json"
        self.log_path = run_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.health_port = -1
        self.metrics_port = 0
        self.http_port = -1  # the gateway's HTTP/REST port, when it serves one

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        prefix = ENV_PREFIX[self.module]
        env = dict(os.environ)
        settings = {"port": 0, "metrics_port": 0, **self.settings}  # free ports unless told otherwise
        env.update({f"{prefix}{key.upper()}": str(value) for key, value in settings.items()})
        env[f"{prefix}PORT_FILE"] = str(self.port_file)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env or {})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def launch(self, timeout_s: float = 60.0) -> ServiceProcess:
        """start() and wait_ready(); a process that never gets ready is killed, not left behind."""
        self.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Ready = port file written (after warm-up) and gRPC health SERVING."""
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready in {timeout_s}s\n{self.log_tail()}")
            time.sleep(0.02)  # poll the readiness signal
        ports = json.loads(self.port_file.read_text())
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        self.health_port = ports.get("health_port", -1)
        self.http_port = ports.get("http_port", -1)
        with self.health_channel() as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=max(1.0, deadline - time.monotonic())
            )
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{self.name} reports {status.status}")

    def health_channel(self) -> grpc.Channel:
        """A blocking channel to the API port: TLS with the service's own certificate when it serves TLS."""
        tls = self.client_tls()
        if tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, tls.credentials())

    def client_tls(self) -> ClientTls | None:
        """How a client of this service's API port connects: None for plaintext, else verifying its certificate
        against its CA and presenting the service's own certificate (signed by that CA: mutual TLS passes)."""
        settings = self.settings
        if settings.get("tls_cert_file") is None:
            return None
        cert, key, ca = (Path(str(settings[name])) for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"))
        return ClientTls(ca, cert, key)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
