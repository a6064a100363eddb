"""Gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from gateway import feedback_servicer
from gateway.auth import KeyStore
from gateway.core import GatewayCore
from gateway.feedback import Feedback, RedisLabelIndex
from gateway.online_accuracy import OnlineAccuracy
from gateway.rest import HttpLimits, RestFront
from gateway.router_calls import RouterCalls
from gateway.router_client import RouterClient
from gateway.settings import GatewaySettings
from infermesh import heap, oip, oip_servicer, prediction_index
from infermesh.errors import DomainError, Unauthenticated
from infermesh.method_handlers import Gate
from infermesh.service import Service

log = logging.getLogger(__name__)


class GatewayService(Service):
    name = "gateway"
    serves_hop_streams = False  # the public edge: clients call it over the Open Inference Protocol
    gates_calls = True
    settings: GatewaySettings
    _reload: asyncio.Task[None] | None = None
    _repository: asyncio.Task[None] | None = None
    _online: asyncio.Task[None] | None = None
    feedback: Feedback | None = None
    rest: RestFront | None = None
    _rest_stopping: asyncio.Task[None] | None = None

    async def register(self, server: Any) -> list[str]:
        settings = self.settings
        heap.reuse_message_buffers(settings.max_message_bytes)
        self.router = RouterClient(
            settings.router_address,
            settings.max_message_bytes,
            settings.router_attempts,
            settings.retry_budget_tokens,
            settings.retry_budget_ratio,
            settings.client_tls(),
            settings.hop_streams,
            not settings.hop_streams_under_load,
            settings.router_unreachable_wait_s,
        )
        router_calls = RouterCalls(
            self.router,
            settings.coalesce_max_inflight_batches,
            settings.max_inflight,
            settings.coalesce,
            settings.max_message_bytes,
        )
        keys = KeyStore.load(
            settings.api_keys_path,
            settings.jwks_path,
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_leeway_s,
        )
        self.core = GatewayCore(
            keys,
            settings.max_inflight,
            self.router,
            router_calls,
            settings.access_log_rate,
            settings.admission_target_ms / 1000 if settings.admission_target_ms > 0 else None,
            settings.admission_min_inflight,
        )
        oip_servicer.add_to_server(oip_servicer.OipServicer(self.core, settings.default_timeout_s), server)
        self.feedback = self._feedback(settings)
        feedback_servicer.add_to_server(
            feedback_servicer.FeedbackServicer(self.feedback, settings.default_timeout_s), server
        )
        return [oip_servicer.SERVICE, feedback_servicer.SERVICE]

    def call_gate(self) -> Gate:
        """Credentials checked from the call's metadata as it starts, before gRPC reads its body: a call without
        good ones is UNAUTHENTICATED at once and holds no call slot, whether or not it ever sends a message. The
        handler checks them again: a dict lookup for a key; a token is verified once and remembered (gateway.auth).
        A ModelInfer call its tenant's quota or the gateway's admission limit would refuse is refused here too
        (RESOURCE_EXHAUSTED with its retry hint), so the excess costs no body read or parse; the handler admits
        for real (a call the gate let through may still be refused there, when others took the room meanwhile)."""
        core = self.core

        # Open: oip_servicer.OPEN_METHODS; grpc.health.v1 never reaches the gate (added to the server itself, not
        # through the registrar).
        def gate(method: str, authorization: str | None) -> DomainError | None:
            if method in oip_servicer.OPEN_METHODS:
                return None
            try:
                tenant = core.keys.authenticate(authorization)
            except Unauthenticated as error:
                return error
            if method == oip_servicer.MODEL_INFER:
                return core.quotas.refusal(tenant) or core.admission.refusal()
            return None

        return gate

    def _feedback(self, settings: GatewaySettings) -> Feedback | None:
        """Label feedback when the prediction log's Redis is given (its password read here, never logged)."""
        if not settings.feedback_redis_url:
            return None
        password = None
        if settings.feedback_redis_password_file is not None:
            password = settings.feedback_redis_password_file.read_text().strip()
        index = RedisLabelIndex(
            prediction_index.connect(settings.feedback_redis_url, password), settings.feedback_stream
        )
        accuracy = OnlineAccuracy(settings.online_window_s, settings.online_slots, settings.online_min_labels)
        return Feedback(self.core, index, accuracy, settings.feedback_max_labels)

    async def warm_up(self) -> None:
        await self._refresh_repository()
        self._reload = asyncio.create_task(self._reload_credentials())
        self._repository = asyncio.create_task(self._repository_loop())
        if self.feedback is not None:
            self._online = asyncio.create_task(self._online_loop(self.feedback.accuracy))
        settings = self.settings
        if settings.http_port >= 0:
            limits = HttpLimits(
                max_body_bytes=settings.max_message_bytes,
                max_json_bytes=settings.http_max_json_bytes,
                max_body_bytes_in_flight=16 * settings.max_message_bytes,
                max_connections=settings.http_max_connections,
                first_request_timeout_s=settings.http_first_request_timeout_s,
            )
            self.rest = RestFront(self.core, oip, settings.default_timeout_s, limits)
            await self.rest.start(settings.host, settings.http_port, settings.server_tls(), settings.grace_period_s)

    def other_ports(self) -> dict[str, int]:
        return {"http_port": self.rest.port} if self.rest is not None else {}

    async def before_drain(self) -> None:
        # The HTTP port drains alongside the gRPC port: it stops accepting now, its requests finish within the grace.
        if self.rest is not None:
            self._rest_stopping = asyncio.create_task(self.rest.stop())

    async def _online_loop(self, accuracy: OnlineAccuracy) -> None:
        """The online windows slide while no label arrives: their gauges follow, a slot at a time."""
        while True:
            await asyncio.sleep(accuracy.window_s / accuracy.slots)
            accuracy.export(time.time())

    async def _refresh_repository(self) -> None:
        # The router not up (yet): requests are UNAVAILABLE until it is; the loop keeps asking.
        with contextlib.suppress(DomainError):
            await self.router.refresh_repository(max(0.1, self.settings.repository_refresh_s))

    async def _repository_loop(self) -> None:
        """The mesh's models as the router knows them: metadata, validation and the index follow loads and
        unloads (and poll-mode changes) without a private copy of the repository."""
        while True:
            await asyncio.sleep(self.settings.repository_refresh_s)
            await self._refresh_repository()

    async def _reload_credentials(self) -> None:
        """Keys and signing keys rotate without a restart: the files are watched (a stat per interval)."""
        while True:
            await asyncio.sleep(self.settings.credentials_reload_s)
            if self.core.keys.reload_if_changed():
                log.info("credentials reloaded")

    async def close(self) -> None:
        if self._rest_stopping is not None:
            await self._rest_stopping
        elif self.rest is not None:  # a start that failed after the HTTP port opened
            await self.rest.stop()
        for task in (self._reload, self._repository, self._online):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.core.close()
        await self.router.close()
        if self.feedback is not None and isinstance(self.feedback.index, RedisLabelIndex):
            await self.feedback.index.close()
