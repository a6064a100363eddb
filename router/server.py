"""Router process: OIP server, replica discovery (static list or headless-Service DNS) and health probes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from infermesh import oip_servicer, prediction_index, repository_service
from infermesh.breaker import CircuitBreaker
from infermesh.hedging import HedgePolicy
from infermesh.proto import router_pb2_grpc
from infermesh.service import Service
from router.clients import FeatureServiceClient, ModelServiceClient
from router.core import RetryPolicy, RouterCore, feature_breaker_changed
from router.discovery import resolve
from router.drift import DriftSettings
from router.prediction_log import PredictionLog
from router.replicas import Ejection, ReplicaSet
from router.servicer import SERVICE, RouterServicer
from router.settings import RouterSettings

log = logging.getLogger(__name__)


def open_prediction_log(settings: RouterSettings) -> PredictionLog | None:
    """The prediction log the settings ask for (None: off). Its key and password are read here, never logged."""
    if not settings.prediction_log_redis_url:
        return None
    if settings.prediction_log_hash_key_file is None:
        raise ValueError("prediction_log_hash_key_file is required with prediction_log_redis_url")
    key = settings.prediction_log_hash_key_file.read_bytes().strip()
    if len(key) < 16:
        raise ValueError("prediction_log_hash_key_file must hold a key of at least 16 bytes")
    password = None
    if settings.prediction_log_redis_password_file is not None:
        password = settings.prediction_log_redis_password_file.read_text().strip()
    return PredictionLog(
        prediction_index.connect(settings.prediction_log_redis_url, password),
        key,
        stream=settings.prediction_log_stream,
        max_len=settings.prediction_log_max_len,
        buffer=settings.prediction_log_buffer,
        index_ttl_s=settings.prediction_log_index_ttl_s,
    )


class RouterService(Service):
    name = "router"
    settings: RouterSettings

    def __init__(self, settings: RouterSettings) -> None:
        super().__init__(settings)
        self._tasks: list[asyncio.Task[None]] = []

    async def register(self, server: Any) -> list[str]:
        settings = self.settings
        tls = settings.client_tls()
        self.prediction_log = open_prediction_log(settings)
        streams, only_when_idle = settings.hop_streams, not settings.hop_streams_under_load
        self.features = FeatureServiceClient(
            settings.feature_service_address, settings.max_message_bytes, tls, streams, only_when_idle
        )
        # Replicas found through DNS are called by IP: their certificates must name the Service.
        replica_tls = (
            dataclasses.replace(tls, server_name=settings.model_service_dns.rpartition(":")[0])
            if tls is not None and settings.model_service_dns
            else tls
        )
        self.replicas = ReplicaSet(
            lambda address: ModelServiceClient(
                address, settings.max_message_bytes, replica_tls, streams, only_when_idle
            ),
            ejection=Ejection(
                settings.eject_s,
                settings.eject_consecutive_failures,
                settings.eject_min_success_rate,
                settings.eject_min_calls,
                settings.max_ejected_share,
            ),
        )
        self.core = RouterCore(
            self.replicas,
            self.features,
            RetryPolicy(
                settings.max_attempts,
                settings.backoff_initial_ms / 1000,
                settings.backoff_max_ms / 1000,
                settings.retry_budget_tokens,
                settings.retry_budget_ratio,
            ),
            max_batch_rows=settings.max_batch_rows,
            max_inflight_batches=settings.max_inflight_batches,
            max_pending_requests=settings.max_pending_requests,
            hedging=HedgePolicy(settings.hedge_max_ratio),
            max_mirrors=settings.max_mirrors,
            mirror_timeout_s=settings.mirror_timeout_ms / 1000,
            mirror_linger_s=settings.mirror_linger_ms / 1000,
            feature_breaker=CircuitBreaker(
                settings.feature_breaker_failures, settings.feature_breaker_open_s, on_change=feature_breaker_changed
            ),
            drift=DriftSettings(
                settings.drift_window_s,
                settings.drift_slots,
                settings.drift_min_rows,
                settings.drift_export_interval_s,
            ),
            prediction_log=self.prediction_log,
        )
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, settings.default_timeout_s), server)
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(self.core, settings.default_timeout_s), server)
        repository_service.add_to_server(self.core, server)
        return [oip_servicer.SERVICE, SERVICE, repository_service.SERVICE]

    async def warm_up(self) -> None:
        try:
            await self._discover()
        except OSError:
            # Kubernetes: the headless Service has no ready pod yet. Start with none; discovery retries.
            log.warning("model service DNS lookup failed at start; retrying every discovery_interval_s")
        await self._probe_health()
        await self._refresh_repository()
        if not self.core.models:
            log.warning("the model replicas serve no model yet")
        self._tasks.append(asyncio.create_task(self._repository_loop()))
        if self.prediction_log is not None:
            self._tasks.append(asyncio.create_task(self.prediction_log.run()))
        if not await self.core.load_feature_defaults():
            self._tasks.append(asyncio.create_task(self._feature_defaults_loop()))
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if self.settings.model_service_dns:
            self._tasks.append(asyncio.create_task(self._discovery_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.core.close()
        await self.features.close()
        if self.prediction_log is not None:
            with contextlib.suppress(TimeoutError):  # what the buffer holds, if Redis takes it within a second
                async with asyncio.timeout(1.0):
                    await self.prediction_log.flush()
            await self.prediction_log.close()
        for replica in list(self.replicas.replicas.values()):
            await replica.client.close()

    async def _discover(self) -> None:
        settings = self.settings
        if settings.model_service_dns:
            addresses = await resolve(settings.model_service_dns)
        else:
            addresses = [a.strip() for a in settings.model_replicas.split(",") if a.strip()]
        for removed in self.replicas.update(addresses):
            await removed.client.close()

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval_s)
            try:
                await self._discover()
            except OSError:
                log.warning("model service DNS lookup failed; keeping the current replicas")

    async def _feature_defaults_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)  # periodic retry until loaded
            if await self.core.load_feature_defaults():
                return

    async def _probe_health(self) -> None:
        replicas = list(self.replicas.replicas.values())
        timeout = max(0.1, self.settings.health_interval_s)
        results = await asyncio.gather(*(r.client.health_check(timeout) for r in replicas))
        for replica, healthy in zip(replicas, results, strict=True):
            self.replicas.set_health(replica, healthy)
        await self.publish_health()

    async def service_serving(self, service_name: str) -> bool:
        # Without a healthy model replica the router can answer nothing: its services say so (NOT_SERVING),
        # so a readiness probe takes it out of rotation. The server's own status stays SERVING: the process is
        # fine, and a liveness probe must not restart it for its replicas' sake.
        return self.replicas.up_count > 0

    async def _refresh_repository(self) -> None:
        await self.core.refresh_repository(max(0.1, self.settings.repository_refresh_s))

    async def _repository_loop(self) -> None:
        """The replicas' model states, read often: a version announced UNLOADING stops getting requests well
        within the replicas' unload grace, and a new one takes requests soon after it is READY."""
        while True:
            await asyncio.sleep(self.settings.repository_refresh_s)
            await self._refresh_repository()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._probe_health()
