"""The gateway's transport-free core: the public dataplane. Authenticates, admits, validates against the
public signature, and forwards to the router (`gateway.router_calls`)."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace

from gateway.auth import KeyStore, Tenant
from gateway.quotas import TenantQuotas
from gateway.router_calls import Routed, RouterCalls, RouterPort
from infermesh import __version__, classification, metrics, timing
from infermesh.admission import AdaptiveLimit
from infermesh.dataplane import (
    Call,
    DataplaneBase,
    EncodedInferResponse,
    InferAnswer,
    InferRequest,
    ModelIndexEntry,
    ModelInfo,
    ServerInfo,
)
from infermesh.errors import DomainError, InvalidInput, Overloaded, Unavailable
from infermesh.model_config import ModelConfig, ModelEntry, find_model, parse_checked
from infermesh.repository import RepositoryState
from infermesh.statistics import ModelStatistics
from infermesh.validation import validate_headers

access_log = logging.getLogger("infermesh.access")

SERVER_NAME = "infermesh"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "classification", "infermesh_features")


class Admission:
    """How many requests the gateway works on at once: an adaptive limit (infermesh.admission) under the static
    cap `max_inflight`. Beyond it a request is refused at once with a retry hint; it never queues."""

    RETRY_AFTER_S = 0.05

    def __init__(self, max_inflight: int, target_latency_s: float | None = None, min_inflight: int = 32) -> None:
        # No target: the static cap alone.
        self.limit = AdaptiveLimit(
            max_inflight,
            target_latency_s if target_latency_s is not None else math.inf,
            min_limit=min_inflight,
            on_change=metrics.ADMISSION_LIMIT.labels("gateway").set,
        )
        metrics.ADMISSION_LIMIT.labels("gateway").set(self.limit.limit)
        self._refused = metrics.ADMISSION_REJECTED.labels("gateway", "max_inflight")

    @property
    def inflight(self) -> int:
        return self.limit.inflight

    def acquire(self) -> float:
        """A token for `release`; Overloaded when the limit is reached."""
        started = self.limit.try_acquire()
        if started is None:
            raise self._refused_now()
        return started

    def refusal(self) -> Overloaded | None:
        """What `acquire` would refuse with now (counted), taking nothing: asked as a call starts."""
        return self._refused_now() if self.limit.full() else None

    def _refused_now(self) -> Overloaded:
        self._refused.inc()
        return Overloaded("server is at capacity, retry later", retry_after_s=self.RETRY_AFTER_S)

    def release(self, token: float) -> None:
        self.limit.release(token)


class GatewayCore(DataplaneBase):
    def __init__(
        self,
        keys: KeyStore,
        max_inflight: int,
        router: RouterPort,
        calls: RouterCalls,
        access_log_rate: float = 0.0,
        admission_target_s: float | None = None,
        admission_min_inflight: int = 32,
    ) -> None:
        self.keys = keys
        self.admission = Admission(max_inflight, admission_target_s, admission_min_inflight)
        self.router = router
        self.router_calls = calls
        self.quotas = TenantQuotas()
        self.access_log_rate = access_log_rate
        self._entries: tuple[RepositoryState, dict[str, ModelEntry]] | None = None

    @property
    def models(self) -> dict[str, ModelEntry]:
        """The mesh's models as the router last said: the gateway keeps no copy of the repository of its own."""
        state = self.router.repository
        if state is None:
            raise Unavailable("the gateway does not know the mesh's models yet; retry shortly")
        if self._entries is None or self._entries[0] is not state:
            self._entries = (state, state.entries())
        return self._entries[1]

    def authenticate(self, call: Call) -> Call:
        if isinstance(call.principal, Tenant):
            return call
        return replace(call, principal=self.keys.authenticate(call.authorization))

    def tenant(self, call: Call) -> Tenant:
        principal = self.authenticate(call).principal
        assert isinstance(principal, Tenant)
        return principal

    def authorized_model(self, call: Call, name: str, version: str = "") -> tuple[Tenant, ModelEntry, str]:
        """The caller, the model it may use and the version it means: UNAUTHENTICATED, then PERMISSION_DENIED (a
        model the tenant may not use, whether or not it exists: names do not leak), then NOT_FOUND (unknown
        model or version). The version is the one resolved (the newest when none was asked): the only kind
        that labels metrics."""
        tenant = self.tenant(call)
        self.keys.authorize(tenant, name)
        entry = find_model(self.models, name)
        return tenant, entry, entry.resolve_version(version)

    # Health and metadata (no key needed for the server-level calls) ----------------------------------

    async def server_ready(self, call: Call) -> bool:
        return await self.router.ready()

    async def server_metadata(self, call: Call) -> ServerInfo:
        return ServerInfo(SERVER_NAME, __version__, EXTENSIONS)

    async def model_ready(self, call: Call, name: str, version: str) -> bool:
        try:
            self.authorized_model(call, name, version)
        except Unavailable:  # a known model or version that is not ready (loading, unloading, unloaded)
            return False
        return await self.router.model_ready(name, version)

    async def model_metadata(self, call: Call, name: str, version: str) -> ModelInfo:
        _, entry, resolved = self.authorized_model(call, name, version)
        metrics.label_request(name, resolved)
        config = entry.config
        return ModelInfo(config.name, entry.versions, config.platform, config.inputs, config.outputs)

    async def model_config(self, call: Call, name: str, version: str) -> ModelConfig:
        _, entry, resolved = self.authorized_model(call, name, version)
        metrics.label_request(name, resolved)
        return entry.config

    # The repository API (admin only) and statistics ---------------------------------------------------------

    def _admin(self, call: Call) -> Tenant:
        tenant = self.tenant(call)
        self.keys.authorize_admin(tenant)
        return tenant

    async def repository_index(self, call: Call, ready_only: bool) -> list[ModelIndexEntry]:
        """Every model version of the mesh with its state (Triton's repository index), as the router has it now."""
        self._admin(call)
        await self.router.refresh_repository(call.deadline.remaining())
        state = self.router.repository
        if state is None:
            raise Unavailable("the mesh's models are not known yet; retry shortly")
        return state.index(ready_only)

    async def repository_load(self, call: Call, name: str, config_json: str | None) -> None:
        self._admin(call)
        if config_json is not None:
            parse_checked(name, config_json)  # refused here, before any hop sees it
        await self.router.load(name, config_json, call.deadline)
        await self.router.refresh_repository(call.deadline.remaining())

    async def repository_unload(self, call: Call, name: str) -> None:
        self._admin(call)
        await self.router.unload(name, call.deadline)
        await self.router.refresh_repository(call.deadline.remaining())

    async def model_statistics(self, call: Call, name: str, version: str) -> list[ModelStatistics]:
        """Triton's statistics of the models the caller's tenant may use."""
        tenant = self.tenant(call)
        if name:
            self.keys.authorize(tenant, name)  # PERMISSION_DENIED before NOT_FOUND: names do not leak
            find_model(self.models, name)
        elif version:
            raise InvalidInput("statistics of a version need the model's name")
        found = await self.router.statistics(name, version, call.deadline)
        return [stats for stats in found if tenant.allows(stats.name)]

    # Inference ---------------------------------------------------------------------------------------

    async def infer(self, call: Call, request: InferRequest) -> InferAnswer:
        if self.access_log_rate and random.random() < self.access_log_rate:
            return await self._logged_infer(call, request)
        return await self._infer(call, request)

    async def _logged_infer(self, call: Call, request: InferRequest) -> InferAnswer:
        """One access log line (sampled): who, which model and version, the outcome, how long, the flags. Never
        inputs, feature values or credentials; the trace id comes with every log line."""
        started = time.perf_counter()
        status, flags = "OK", {}
        try:
            answer = await self._infer(call, request)
            if isinstance(answer, EncodedInferResponse):
                flags = self.router.flags_of(answer.data)
            return answer
        except DomainError as error:
            status = error.code.name
            raise
        finally:
            # Only names the mesh knows: a model or version the caller made up is not logged.
            entry = self.router_models().get(request.model)
            version = ""
            if entry is not None and status == "OK":
                try:
                    version = entry.resolve_version(request.version)
                except DomainError:  # the version left service since it answered: log the line without it
                    version = ""
            try:
                tenant = self.tenant(call).name  # authenticated already, but for a call made in-process
            except DomainError:
                tenant = ""
            fields = {
                "tenant": tenant,
                "model": request.model if entry is not None else "",
                "version": version,
                "status": status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                **flags,
            }
            access_log.info("access", extra={"fields": fields})

    async def _infer(self, call: Call, request: InferRequest) -> InferAnswer:
        timed_from = time.perf_counter() if timing.wanted(request.parameters) else None
        tenant, entry, resolved = self.authorized_model(call, request.model, request.version)
        metrics.label_request(entry.config.name, resolved)
        request.tenant = tenant.name  # the router's prediction log records who asked (label feedback)
        with self.quotas.admit(tenant):
            admitted = self.admission.acquire()  # refused at once, before any work, past the adaptive limit
            try:
                config = entry.config
                config.select_outputs(request.outputs)  # client-chosen names: checked before they are used anywhere
                classification.check(request.classes, config.outputs)
                # The declared shapes first, the data only then, and bounded by them: a malformed request costs
                # the same small time whatever it claims.
                rows = validate_headers(config.name, config.inputs, config.max_batch_size, request.inputs.headers)
                request.inputs.tensors(config.element_limits)
                routed = await self.router_calls.infer(entry, request, rows, call.deadline)
            finally:
                self.admission.release(admitted)
            if request.classes:  # Triton's classification extension, on the answer as the client gets it
                labels = {spec.name: spec.labels for spec in config.outputs if spec.labels}
                classified = self.router.classified(routed.data, request.classes, config.max_batch_size > 0, labels)
                routed = replace(routed, data=classified)
            if timed_from is None:
                return EncodedInferResponse(routed.data)
            return EncodedInferResponse(self._with_timing(routed, timed_from))

    def _with_timing(self, routed: Routed, started: float) -> bytes:
        """The answer with the gateway's share and the transport to the router added to the hops' timings."""
        below = self.router.flags_of(routed.data)
        # The router call, less what the hops below measured of it (their own transport aside), was transport.
        transport = routed.router_s - timing.seconds_of(below, timing.MEASURED_AT_HOPS)
        spent = {
            timing.GATEWAY: timing.ms(time.perf_counter() - started - routed.router_s),
            timing.TRANSPORT: timing.ms(transport),
        }
        return self.router.with_flags(routed.data, spent)

    def router_models(self) -> dict[str, ModelEntry]:
        try:
            return self.models
        except Unavailable:
            return {}

    async def close(self) -> None:
        await self.router_calls.close()
