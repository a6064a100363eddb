"""The router's transport-free core: its dataplane. Resolves the model, joins fresh features into the model's
input (router.join), coalesces concurrent requests into shared feature reads and model calls, and retries
across replicas.

Every request is a batch of segments (infermesh.segments): a plain ModelInfer is a batch of one, a gateway's
`InferBatch` one of several, and both take the same path. Downstream services are reached through two small
client protocols (implemented over gRPC in `router.clients`), so this module imports no transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from infermesh import __version__, metrics, telemetry, timing
from infermesh.breaker import BreakerState, CircuitBreaker
from infermesh.coalescer import Coalescer, Pending
from infermesh.dataplane import (
    Call,
    DataplaneBase,
    InferAnswer,
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelInfo,
    ServerInfo,
)
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, DomainError, Overloaded, Unavailable
from infermesh.features import (
    DEFAULTED_ENTITIES,
    STALE_DEFAULTED_ROWS,
    FeatureBlock,
    FeatureQuery,
    ages_wanted,
)
from infermesh.hedging import HedgePolicy
from infermesh.model_config import ModelConfig, ModelEntry, Traffic, find_model, parse_checked
from infermesh.priority import DEFAULT_PRIORITY, queue_policy
from infermesh.repository import RepositoryState
from infermesh.retry import RetryBudget, with_retries
from infermesh.segments import (
    BatchResult,
    InferBatch,
    Segment,
    SegmentResult,
    check_segments,
    slice_rows,
    split_tensors,
)
from infermesh.statistics import ModelStatistics, add_up
from infermesh.tensors import Tensor
from infermesh.validation import batch_too_large, validate_headers
from router import join
from router.drift import DriftMonitors, DriftSettings
from router.prediction_log import LoggedRequest, PredictionLog
from router.replicas import Replica, ReplicaSet
from router.traffic import (
    ANSWERING_MODEL,
    ARM,
    CANARY,
    CASCADE,
    FALLBACK,
    REQUESTED,
    Mirror,
    TrafficControl,
    is_version_failure,
    rolled_back_config,
)

log = logging.getLogger(__name__)

SERVER_NAME = "infermesh-router"
EXTENSIONS = ("model_repository", "infermesh_features")

# Mirrored calls (shadows, a canary's comparison) queue behind every request at the model service.
MIRROR_PRIORITY = 1000
# Rows a mirror target may have waiting, in batches of the model's size: past it copies are dropped (counted).
MIRROR_QUEUE_BATCHES = 4

# What a feature-joined request gets back from its shared batch: the served version, its outputs, its flags.
_Answer = tuple[str, dict[str, Tensor], dict[str, str]]


class FeatureReader(Protocol):
    async def read(self, queries: Sequence[FeatureQuery], deadline: Deadline) -> list[FeatureBlock]: ...

    async def defaults(self, deadline: Deadline) -> dict[str, dict[str, float]]:
        """Each view's default value per feature (from the feature registry)."""
        ...


@dataclass(slots=True)
class ModelAnswer:
    version: str  # the version that served
    outputs: dict[str, Tensor]
    timing: dict[str, str]  # the model service's per-hop timing parameters, when asked for
    seconds: float = 0.0  # the whole call, as the router saw it


class ModelClient(Protocol):
    async def infer(
        self,
        model: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> ModelAnswer:
        """`timed`: ask the model service for its per-hop timing (infermesh.timing); `priority`: its queue's."""
        ...

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None: ...

    async def unload(self, model: str, deadline: Deadline) -> None: ...

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]: ...

    async def repository_state(self, timeout_s: float) -> RepositoryState | None:
        """The replica's repository state when it changed since the last call, else None."""
        ...


@dataclass(slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_initial_s: float = 0.002
    backoff_max_s: float = 0.05
    budget_tokens: float = 20.0  # each downstream's retry budget (infermesh.retry.RetryBudget)
    budget_ratio: float = 0.1


class RouterCore(DataplaneBase):
    def __init__(
        self,
        replicas: ReplicaSet,
        features: FeatureReader,
        retry: RetryPolicy,
        max_batch_rows: int = 1024,
        max_inflight_batches: int = 4,
        max_pending_requests: int = 4096,
        feature_breaker: CircuitBreaker | None = None,
        hedging: HedgePolicy | None = None,
        max_mirrors: int = 64,
        mirror_timeout_s: float = 1.0,
        mirror_linger_s: float = 0.1,
        drift: DriftSettings | None = None,
        prediction_log: PredictionLog | None = None,
    ) -> None:
        self.replicas = replicas
        self.features = features
        self.retry = retry
        # One retry budget per downstream: a failing one gets a few retries, not a multiple of the traffic.
        self.feature_retries = RetryBudget("feature_service", retry.budget_tokens, retry.budget_ratio)
        self.model_retries = RetryBudget("model_service", retry.budget_tokens, retry.budget_ratio)
        self.hedging = hedging or HedgePolicy()
        # view → feature → default, for serving policy-'default' models while the feature store is down.
        self.feature_defaults: dict[str, dict[str, float]] = {}
        # One for the feature store: while it is open, reads are not even tried (the policy answers at once).
        self.feature_breaker = feature_breaker or CircuitBreaker(on_change=feature_breaker_changed)
        metrics.CIRCUIT_OPEN.labels("feature_service").set(0)  # exported from the start, closed
        self._max_batch_rows = max_batch_rows
        self._max_inflight_batches = max_inflight_batches
        self._max_pending_requests = max_pending_requests
        # One coalescer per (model, version): only requests for the same model version share a batch.
        self._coalescers: dict[str, _ModelCoalescer] = {}
        self._entries: tuple[RepositoryState, dict[str, ModelEntry]] | None = None
        self.traffic = TrafficControl(on_rollback=self._rolled_back)
        # Mirrored calls in flight (and rollbacks being recorded): bounded, dropped and counted past the bound.
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self._max_mirrors = max_mirrors
        self._mirror_queues: dict[tuple[str, Mirror], _MirrorQueue] = {}
        self._mirror_timeout_s = mirror_timeout_s
        self._mirror_linger_s = mirror_linger_s
        # What the mesh watches of its answers: drift against each version's profile, a sampled prediction log.
        self.drift = DriftMonitors(drift or DriftSettings(), self.replicas.repository)
        self.prediction_log = prediction_log

    # The repository: what the replicas serve --------------------------------------------------------------

    @property
    def models(self) -> dict[str, ModelEntry]:
        """Every model the replicas know, with the versions some healthy replica has READY."""
        state = self.replicas.repository()
        if self._entries is None or self._entries[0] is not state:
            self._entries = (state, state.entries())
        return self._entries[1]

    def repository_state(self) -> RepositoryState:
        """The replicas' states merged (the gateway reads it: infermesh.repository_service)."""
        return self.replicas.repository()

    async def refresh_repository(self, timeout_s: float) -> None:
        """Ask every replica for its repository state (a small message when it did not change)."""
        replicas = list(self.replicas.replicas.values())
        states = await asyncio.gather(
            *(replica.client.repository_state(timeout_s) for replica in replicas), return_exceptions=True
        )
        for replica, state in zip(replicas, states, strict=True):
            if isinstance(state, RepositoryState):
                self.replicas.set_repository(replica, state)
            elif isinstance(state, Exception) and not isinstance(state, DomainError):
                # Not a failed call (health sees those) but a state that does not read: keep the last one.
                log.error("replica repository state unreadable", extra={"fields": {"replica": replica.address}})

    async def repository_index(self, call: Call, ready_only: bool) -> list[ModelIndexEntry]:
        return self.replicas.repository().index(ready_only)

    async def repository_load(self, call: Call, name: str, config_json: str | None) -> None:
        """Load on every healthy replica at once; each warms the new versions before they take requests."""
        if config_json is not None:
            parse_checked(name, config_json)  # an invalid config is refused here, before any replica sees it
        await self._on_every_replica(lambda client: client.load(name, config_json, call.deadline))

    async def repository_unload(self, call: Call, name: str) -> None:
        find_model(self.models, name)
        await self._on_every_replica(lambda client: client.unload(name, call.deadline))

    async def _on_every_replica(self, operation: Callable[[ModelClient], Awaitable[None]]) -> None:
        """Run a repository operation on every healthy replica; the first failure is the answer, once all ended.
        The replicas' states are read again afterwards, so the answer comes with the mesh's view up to date."""
        replicas = [r for r in self.replicas.replicas.values() if r.healthy]
        if not replicas:
            raise Unavailable("no model service replica is available")
        outcomes = await asyncio.gather(*(operation(r.client) for r in replicas), return_exceptions=True)
        await self.refresh_repository(timeout_s=2.0)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def model_statistics(self, call: Call, name: str, version: str) -> list[ModelStatistics]:
        """The replicas' figures added up per model version."""
        if name:
            find_model(self.models, name)
        replicas = [r for r in self.replicas.replicas.values() if r.healthy]
        parts = await asyncio.gather(*(r.client.statistics(name, version, call.deadline) for r in replicas))
        return add_up(stats for part in parts for stats in part)

    # Health and metadata -----------------------------------------------------------------------------

    async def server_ready(self, call: Call) -> bool:
        return self.replicas.up_count > 0

    async def server_metadata(self, call: Call) -> ServerInfo:
        return ServerInfo(SERVER_NAME, __version__, EXTENSIONS)

    async def model_ready(self, call: Call, name: str, version: str) -> bool:
        try:
            resolved = find_model(self.models, name).resolve_version(version)
        except DomainError:
            return False
        now = time.monotonic()
        return any(r.available(now) and r.serves((name, resolved)) for r in self.replicas.replicas.values())

    async def model_metadata(self, call: Call, name: str, version: str) -> ModelInfo:
        config = await self.model_config(call, name, version)
        return ModelInfo(config.name, self.models[name].versions, config.platform, config.inputs, config.outputs)

    async def model_config(self, call: Call, name: str, version: str) -> ModelConfig:
        entry = find_model(self.models, name)
        metrics.label_request(name, entry.resolve_version(version))
        return entry.config

    # Inference ---------------------------------------------------------------------------------------

    async def infer(self, call: Call, request: InferRequest) -> InferAnswer:
        """A plain request: a batch of one segment, all of its rows."""
        segment = Segment(0, request.id, request.parameters, call.tenant)  # rows: set once the inputs are validated
        batch = InferBatch(request.model, request.version, request.inputs, request.outputs, [segment])
        result = await self._serve(call, batch, one_request=True)
        (answer,) = result.segments
        if answer.error is not None:
            raise answer.error
        return InferResponse(result.model, answer.version or result.version, answer.outputs, request.id, answer.flags)

    async def infer_batch(self, call: Call, batch: InferBatch) -> BatchResult:
        """Each segment succeeds or fails on its own, as if sent alone; a failure of the batch as a whole (unknown
        model, malformed inputs, no replica) raises."""
        return await self._serve(call, batch, one_request=False)

    async def _serve(self, call: Call, batch: InferBatch, one_request: bool) -> BatchResult:
        started = time.perf_counter()
        entry = find_model(self.models, batch.model)
        config = entry.config
        version = entry.resolve_version(batch.version)
        metrics.label_request(config.name, version)  # labels carry resolved versions only
        output_names = [spec.name for spec in config.select_outputs(batch.outputs)]
        # A gateway's batch is several requests: the model's limit applies to each (below), not to their sum.
        limit = config.max_batch_size * (1 if one_request else max(1, len(batch.segments)))
        batch_rows = validate_headers(config.name, config.inputs, config.max_batch_size, batch.inputs.headers, limit)
        tensors = batch.inputs.tensors(config.element_limits)
        segments = batch.segments
        if one_request:
            segments[0].rows = batch_rows
        check_segments(segments, batch_rows)
        rows = [segment.rows for segment in segments]
        timed = [timing.wanted(segment.parameters) for segment in segments]
        work = _Work(entry, output_names, segments, rows, timed, call.deadline)
        requested = version if batch.version else ""
        oversized = [i for i, count in enumerate(rows) if count > config.max_batch_size]
        if oversized:  # merged by a gateway under a larger limit than the config in force now (it just changed)
            results = await self._answer_within_limit(work, split_tensors(tensors, rows), oversized, requested)
        elif config.traffic is None:
            results = await self._answer(work, version, whole=tensors)
        else:
            parts = [tensors] if len(rows) == 1 else split_tensors(tensors, rows)
            results = await self._answer_by_traffic(work, parts, requested)
        _add_router_time(results, timed, started)
        return BatchResult(config.name, results[0].version or version, output_names, results)

    async def _answer_within_limit(
        self, work: _Work, parts: list[dict[str, Tensor]], oversized: list[int], requested: str
    ) -> list[SegmentResult]:
        """The segments within the model's batch limit answered as usual; each beyond it refused on its own."""
        config = work.entry.config
        results: list[SegmentResult | None] = [None] * len(parts)
        for index in oversized:
            error = batch_too_large(config.name, config.inputs[0].name, work.rows[index], config.max_batch_size)
            results[index] = SegmentResult(work.rows[index], error=error)
        keep = [i for i, result in enumerate(results) if result is None]
        if keep:
            kept, kept_parts = work.subset(keep), [parts[i] for i in keep]
            if config.traffic is None:
                answered = await self._answer(kept, work.entry.resolve_version(requested), parts=kept_parts)
            else:
                answered = await self._answer_by_traffic(kept, kept_parts, requested)
            for index, result in zip(keep, answered, strict=True):
                results[index] = result
        return [result for result in results if result is not None]

    async def _answer(
        self,
        work: _Work,
        version: str,
        whole: dict[str, Tensor] | None = None,
        parts: list[dict[str, Tensor]] | None = None,
        versions: Sequence[str] | None = None,
    ) -> list[SegmentResult]:
        """Every segment of `work` answered by `version` (or its own error): the segments' tensors as one batch
        (`whole`) or one per segment (`parts`), whichever the caller has. A feature-joined model may answer each
        segment by a version of its own (`versions`): they share the batch's feature read."""
        config = work.entry.config
        rows, timed, output_names, deadline = work.rows, work.timed, work.output_names, work.deadline
        if config.feature_spec is None:
            for segment in work.segments:
                queue_policy(segment.parameters)  # checked as for any model; no queue here to order
            if len(rows) > 1 and sum(rows) > config.max_batch_size:  # a gateway's batch: calls within the limit
                if parts is None:
                    assert whole is not None
                    parts = split_tensors(whole, rows)
                chunks = _chunks(rows, config.max_batch_size)
                answered = await asyncio.gather(
                    *(self._answer(work.subset(chunk), version, parts=[parts[i] for i in chunk]) for chunk in chunks)
                )
                return [result for chunk in answered for result in chunk]
            inputs = whole if whole is not None else _concatenate(parts or [])
            model = await self.call_model(config.name, version, list(inputs.values()), deadline, any(timed))
            if config.traffic is not None:
                self._mirror(config, version, list(inputs.values()), model.outputs)
            self.drift.observe(config, model.version, model.outputs, inputs=inputs)
            if self.prediction_log is not None:
                self._log_segments(config, model, work, inputs)
            sliced_results, row = [], 0
            for count, wants_timing in zip(rows, timed, strict=True):
                sliced = [slice_rows(model.outputs[n], row, row + count) for n in output_names if n in model.outputs]
                flags = _model_timing(model) if wants_timing else {}
                sliced_results.append(SegmentResult(count, sliced, flags, version=model.version))
                row += count
            return sliced_results

        spec = config.feature_spec
        if parts is None:
            assert whole is not None
            parts = [whole] if len(rows) == 1 else split_tensors(whole, rows)
        results_by_index: dict[int, SegmentResult] = {}
        pendings: list[Pending] = []
        for index, (part, count) in enumerate(zip(parts, rows, strict=True)):
            try:
                priority, queue_until = queue_policy(work.segments[index].parameters)
                parameters = work.segments[index].parameters
                joined = join.join_request(spec, part, count, timed[index], ages_wanted(parameters))
                joined.request_id = work.segments[index].id
                joined.version = versions[index] if versions is not None else version
                joined.tenant = work.segments[index].tenant
                pendings.append(Pending(joined, count, deadline, priority=priority, queue_until=queue_until))
            except DomainError as error:
                results_by_index[index] = SegmentResult(count, error=error)
        coalescer = self._coalescer(work.entry)
        answers: list[_Answer | BaseException]
        if len(pendings) == 1:
            try:
                answers = [await coalescer.submit(pendings[0])]
            except DomainError as error:
                answers = [error]
        else:
            answers = await coalescer.submit_many(pendings) if pendings else []
        pending_answers = iter(answers)
        results: list[SegmentResult] = []
        for index, count in enumerate(rows):
            failed = results_by_index.get(index)
            if failed is not None:
                results.append(failed)
                continue
            answer = next(pending_answers)
            if isinstance(answer, DomainError):
                results.append(SegmentResult(count, error=answer))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                served, outputs, flags = answer
                results.append(SegmentResult(count, [outputs[n] for n in output_names], flags, version=served))
        return results

    async def _answer_by_traffic(
        self, work: _Work, parts: list[dict[str, Tensor]], requested: str
    ) -> list[SegmentResult]:
        """A model with a traffic section: each segment goes where the split sends it (unless the request named its
        version); one that fails on a non-baseline version is answered by the baseline; then the cascade, if any."""
        config = work.entry.config
        traffic = config.traffic
        assert traffic is not None
        routed = not requested
        sticky = traffic.sticky_input
        if not routed:
            arms = [(requested, REQUESTED)] * len(parts)
        elif sticky:
            arms = [self.traffic.choose(config, part.get(sticky)) for part in parts]
        else:
            # One draw for the whole batch: each request still lands on a version with that version's weight as its
            # probability, and the batch stays one model call instead of one per version it would mix.
            arms = [self.traffic.choose(config, None)] * len(parts)
        results = await self._answer_arms(work, parts, arms)
        baseline = traffic.baseline
        failed = [
            index
            for index, (result, (version, _)) in enumerate(zip(results, arms, strict=True))
            if routed and version != baseline and result.error is not None and is_version_failure(result.error)
        ]
        if failed and work.deadline.remaining() > 0:
            fallback = [(baseline, FALLBACK)] * len(failed)
            retried = await self._answer_arms(work.subset(failed), [parts[i] for i in failed], fallback)
            for index, result in zip(failed, retried, strict=True):
                results[index] = result
                arms[index] = (baseline, FALLBACK)
        if routed and traffic.cascade is not None:
            await self._cascade(work, parts, results, arms)
        for result, (_, arm) in zip(results, arms, strict=True):
            if result.error is None:
                result.flags[ARM] = arm
                metrics.TRAFFIC_REQUESTS.labels(arm, config.name, result.version).inc()
        return results

    async def _answer_arms(
        self, work: _Work, parts: list[dict[str, Tensor]], arms: list[tuple[str, str]]
    ) -> list[SegmentResult]:
        """Each segment answered by the version of its arm; a canary's answers (or failures) are counted by the
        guard. A feature-joined model answers them all in one batch (one feature read, a model call per version);
        another, one batch per version at once."""
        config = work.entry.config
        groups: dict[str, list[int]] = {}
        for index, (version, _) in enumerate(arms):
            groups.setdefault(version, []).append(index)
        results: list[SegmentResult] = [SegmentResult(0)] * len(parts)

        async def answer(version: str, indexes: list[int], versions: list[str] | None = None) -> None:
            started = time.perf_counter()
            group = work if len(indexes) == len(parts) else work.subset(indexes)
            try:
                answers = await self._answer(group, version, parts=[parts[i] for i in indexes], versions=versions)
            except DomainError as error:  # the whole group failed (no replica serves the version, …)
                answers = [SegmentResult(work.rows[i], error=error) for i in indexes]
            elapsed = time.perf_counter() - started
            for index, result in zip(indexes, answers, strict=True):
                results[index] = result
                version, arm = arms[index]
                if arm == CANARY:
                    self.traffic.record(config, version, elapsed, _version_failed(result))

        if len(groups) == 1:  # the common case: no task to spawn
            ((version, indexes),) = groups.items()
            await answer(version, indexes)
        elif config.feature_spec is not None:
            await answer(arms[0][0], list(range(len(parts))), versions=[version for version, _ in arms])
        else:
            await asyncio.gather(*(answer(version, indexes) for version, indexes in groups.items()))
        return results

    async def _cascade(
        self, work: _Work, parts: list[dict[str, Tensor]], results: list[SegmentResult], arms: list[tuple[str, str]]
    ) -> None:
        """The segments whose answer has a row inside the cascade's band are answered by the larger model instead,
        within the deadline; when it cannot answer in time, the first answer stands."""
        config = work.entry.config
        assert config.traffic is not None and config.traffic.cascade is not None
        cascade = config.traffic.cascade
        output = cascade.output or config.outputs[0].name
        if output not in work.output_names:
            return  # the request did not ask for the output the cascade decides on
        position = work.output_names.index(output)
        low, high = cascade.when_output_between
        inside = []
        for index, result in enumerate(results):
            if result.error is None:
                data = result.outputs[position].data
                if np.any((data >= low) & (data <= high)):
                    inside.append(index)
        counter = metrics.CASCADES
        counter.labels(config.name, "small").inc(len(results) - len(inside))
        if not inside:
            return
        try:
            large = find_model(self.models, cascade.model)
            large_version = large.resolve_version("")
            usable = all(spec.name in parts[0] for spec in large.config.inputs) and all(
                name in {spec.name for spec in large.config.outputs} for name in work.output_names
            )
        except DomainError:
            usable = False
        remaining = work.deadline.remaining()
        if not usable or remaining <= 0:
            counter.labels(config.name, "skipped").inc(len(inside))
            return
        # Most of the time left, not all of it: the first answer must still reach the client if this fails.
        larger = replace(work.subset(inside), entry=large, deadline=work.deadline.within(remaining * 0.8))
        try:
            answers = await self._answer(larger, large_version, parts=[parts[i] for i in inside])
        except DomainError:
            answers = [SegmentResult(0, error=Unavailable("cascade failed"))] * len(inside)
        for index, answer in zip(inside, answers, strict=True):
            if answer.error is None:
                answer.flags[ANSWERING_MODEL] = large.config.name
                results[index] = answer
                arms[index] = (answer.version, CASCADE)
                counter.labels(config.name, "large").inc()
            else:
                counter.labels(config.name, "skipped").inc()

    def _mirror(self, config: ModelConfig, version: str, inputs: list[Tensor], outputs: dict[str, Tensor]) -> None:
        """Queue the copies the traffic section asks for of a batch `version` served (never waited for). Each
        mirror target sends one call at a time, after lingering a moment for more; batches served meanwhile
        leave together in the next, so mirrors cost few calls at any load. Past a bound, copies are dropped and
        counted."""
        rows = inputs[0].shape[0] if inputs and inputs[0].shape else 0
        limit = min(self._max_batch_rows, config.max_batch_size)
        for mirror in self.traffic.mirrors(config, version):
            key = (config.name, mirror)
            queue = self._mirror_queues.get(key)
            if queue is None:
                queue = self._mirror_queues[key] = _MirrorQueue()
            if queue.rows + rows > MIRROR_QUEUE_BATCHES * limit or (
                queue.task is None and len(self._mirror_tasks) >= self._max_mirrors
            ):
                metrics.MIRRORS_DROPPED.labels(config.name, "busy").inc()
                continue
            queue.items.append((inputs, outputs, rows))
            queue.rows += rows
            if queue.task is None:
                task = asyncio.get_running_loop().create_task(self._drain_mirrors(config, mirror, key, limit))
                queue.task = task
                self._mirror_tasks.add(task)
                task.add_done_callback(self._mirror_tasks.discard)

    async def _drain_mirrors(self, config: ModelConfig, mirror: Mirror, key: tuple[str, Mirror], limit: int) -> None:
        queue = self._mirror_queues[key]
        try:
            while queue.items:
                if queue.rows < limit and self._mirror_linger_s > 0:
                    await asyncio.sleep(self._mirror_linger_s)  # more served batches join this call meanwhile
                taken: list[tuple[list[Tensor], dict[str, Tensor], int]] = []
                rows = 0
                while queue.items and (not taken or rows + queue.items[0][2] <= limit):
                    item = queue.items.popleft()
                    taken.append(item)
                    rows += item[2]
                queue.rows -= rows
                if len(taken) == 1:
                    inputs, outputs, _ = taken[0]
                else:
                    inputs = list(_concatenate([{t.name: t for t in item[0]} for item in taken]).values())
                    outputs = _concatenate([item[1] for item in taken])
                await self._send_mirror(config, mirror, inputs, outputs)
        finally:
            queue.task = None
            if not queue.items:  # gone until the next copy: the table holds only targets with work
                del self._mirror_queues[key]

    async def _send_mirror(
        self, config: ModelConfig, mirror: Mirror, inputs: list[Tensor], outputs: dict[str, Tensor]
    ) -> None:
        """One mirrored call, at the lowest priority and without retries; its replica's health is not judged by it
        (a slow shadow says nothing of the replica)."""
        started = time.perf_counter()
        try:
            replica = self.replicas.choose(frozenset(), serving=(config.name, mirror.version))
            replica.inflight += 1
            try:
                answer = await replica.client.infer(
                    config.name, mirror.version, inputs, Deadline.after(self._mirror_timeout_s), False, MIRROR_PRIORITY
                )
            finally:
                replica.inflight -= 1
        except DomainError:
            metrics.MIRRORS_DROPPED.labels(config.name, "failed").inc()
            return
        self.traffic.compared(config, mirror, outputs, answer.outputs, time.perf_counter() - started)

    def _rolled_back(self, model: str, version: str, reason: str, traffic: Traffic) -> None:
        """The guard rolled `version` back here: record it in the model's config on every replica, so that every
        router and the repository index agree (until then this router's overlay holds it)."""
        task = asyncio.get_running_loop().create_task(self._record_rollback(model, version, reason, traffic))
        self._mirror_tasks.add(task)  # bounded by the versions of a split; kept until done
        task.add_done_callback(self._mirror_tasks.discard)

    async def _record_rollback(self, model: str, version: str, reason: str, traffic: Traffic) -> None:
        state = self.replicas.repository().models.get(model)
        if state is None or state.config.traffic != traffic:
            return  # the config changed meanwhile: it is the operator's now
        config_json = rolled_back_config(state.config, version, reason)
        try:
            await self._on_every_replica(lambda client: client.load(model, config_json, Deadline.after(10.0)))
        except DomainError as error:
            log.error("rollback not recorded in the config", extra={"fields": {"model": model, "error": str(error)}})

    def _coalescer(self, entry: ModelEntry) -> Coalescer:
        """The model's coalescer: requests for any of its versions share a feature read (each version its own
        model call), so a canary or a pinned version costs no feature reads of its own."""
        name = entry.config.name
        coalescer = self._coalescers.get(name)
        if coalescer is not None and coalescer.config.serving_json != entry.config.serving_json:
            # The model's config changed (its batch limit, its features): new requests go to a new coalescer; the
            # old one sends what it holds (its tasks keep it alive) and is gone.
            coalescer = None
        if coalescer is None:
            coalescer = self._coalescers[name] = _ModelCoalescer(
                entry.config,
                "router",
                name,
                self._batch_runner(entry),
                max_rows=min(self._max_batch_rows, entry.config.max_batch_size),
                max_inflight=self._max_inflight_batches,
                max_pending=self._max_pending_requests,
            )
        return coalescer

    def _batch_runner(self, entry: ModelEntry) -> Callable[[list[Pending]], Awaitable[None]]:
        """One feature read for every request of a coalesced batch, and one model call per version they want."""
        config = entry.config
        spec = config.feature_spec
        model_input = config.model_input
        assert spec is not None and model_input is not None  # a feature_spec needs model_input (ModelConfig)
        defaulted_counter = metrics.FEATURE_DEFAULTED.labels(config.name)
        fetch_latency = metrics.FEATURE_FETCH_LATENCY.labels(config.name)

        async def run(batch: list[Pending]) -> None:
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            dispatched_ns = time.perf_counter_ns()
            deadline = Deadline.latest([p.deadline for p in batch])
            requests: list[join.JoinRequest] = [p.payload for p in batch]
            plan = join.plan(spec, requests)
            started = time.perf_counter()
            features_unavailable = False
            with telemetry.span("router.feature_fetch", model=config.name, entities=plan.rows):
                try:
                    blocks = await self.fetch_features(plan.queries, deadline.within(spec.timeout_ms / 1000))
                except (Unavailable, Overloaded, DeadlineExceeded) as error:
                    if deadline.expired:
                        raise DeadlineExceeded(
                            f"model '{config.name}': deadline passed while reading features"
                        ) from error
                    # Policy 'default' keeps answering (flagged) through a feature store outage or stall, within
                    # the model's feature budget; 'reject' fails fast.
                    fallback = None
                    if spec.on_missing != "reject":
                        fallback = join.default_blocks(plan.queries, self.feature_defaults)
                    if fallback is None:
                        raise Unavailable(f"features for model '{config.name}' are unavailable") from error
                    blocks, features_unavailable = fallback, True
            feature_read_s = time.perf_counter() - started
            fetch_latency.observe(feature_read_s)
            joined = join.join(spec, requests, plan, blocks, features_unavailable, self.feature_defaults)
            kept: list[tuple[Pending, dict[str, str]]] = []
            for pending, outcome in zip(batch, joined.outcomes, strict=True):
                if isinstance(outcome, DomainError):
                    if not pending.future.done():
                        pending.future.set_exception(outcome)
                    continue
                if DEFAULTED_ENTITIES in outcome or STALE_DEFAULTED_ROWS in outcome:
                    defaulted_counter.inc()
                kept.append((pending, outcome))
            if not kept:
                return
            current = self.models.get(config.name)  # the traffic section in force now, not when this was built
            in_force = current.config if current is not None else config
            groups: dict[str, list[_Joined]] = {}
            lo = 0
            for pending, flags in kept:
                groups.setdefault(pending.payload.version, []).append(_Joined(pending, flags, lo))
                lo += pending.rows

            async def answer(version: str, members: list[_Joined]) -> None:
                if len(groups) == 1:
                    rows = joined.features
                else:  # this version's rows of the joined features (a copy, only when versions share the batch)
                    rows = joined.features[np.concatenate([np.arange(m.lo, m.lo + m.pending.rows) for m in members])]
                features = Tensor(model_input.name, "FP32", rows.shape, rows)
                timed = any(m.pending.payload.timed for m in members)
                priority = min(m.pending.priority for m in members)  # queued at the model as its most urgent
                try:
                    model = await self.call_model(config.name, version, [features], deadline, timed, priority)
                except DomainError as error:
                    if len(groups) == 1:
                        raise  # the coalescer fails the whole batch
                    for member in members:
                        if not member.pending.future.done():
                            member.pending.future.set_exception(error)
                    return
                if in_force.traffic is not None:
                    self._mirror(in_force, version, [features], model.outputs)
                self.drift.observe(config, model.version, model.outputs, features=rows)
                if self.prediction_log is not None:
                    self._log_batch(in_force, model, [(m.pending, m.flags) for m in members], rows)
                row = 0
                for member in members:
                    pending, flags, count = member.pending, member.flags, member.pending.rows
                    if pending.payload.timed:
                        flags = {
                            **flags,
                            timing.ROUTER_WAIT: timing.ms((dispatched_ns - pending.enqueued_ns) / 1e9),
                            timing.FEATURE_READ: timing.ms(feature_read_s),
                            **_model_timing(model),
                        }
                    if not pending.future.done():
                        sliced = {n: slice_rows(t, row, row + count) for n, t in model.outputs.items()}
                        pending.future.set_result((model.version, sliced, flags))
                    row += count

            if len(groups) == 1:
                ((version, members),) = groups.items()
                await answer(version, members)
            else:
                await asyncio.gather(*(answer(version, members) for version, members in groups.items()))

        return run

    def _log_batch(
        self, config: ModelConfig, model: ModelAnswer, kept: list[tuple[Pending, dict[str, str]]], features: np.ndarray
    ) -> None:
        """The sampled requests of a feature-joined batch into the prediction log (nothing when the model does not
        log: one check)."""
        assert self.prediction_log is not None
        sampled = self.prediction_log.sample(config, len(kept))
        if not sampled:
            return
        spec = config.feature_spec
        starts = np.cumsum([0] + [pending.rows for pending, _ in kept]).tolist()
        records = []
        for index in sampled:
            pending, flags = kept[index]
            request: join.JoinRequest = pending.payload
            raw: dict[str, Any] = {}
            if config.monitoring is not None and config.monitoring.log_raw_inputs and spec is not None:
                raw = {**request.ids, **dict(zip(spec.request_inputs, request.request_inputs, strict=True))}
            rows = (starts[index], starts[index + 1])
            records.append(
                LoggedRequest(request.request_id, rows, flags, request.ids, pending.trace_context, raw, request.tenant)
            )
        self.prediction_log.record(config, model.version, records, model.outputs, features)

    def _log_segments(self, config: ModelConfig, model: ModelAnswer, work: _Work, inputs: dict[str, Tensor]) -> None:
        """The sampled requests of a batch of a model without a feature_spec (its inputs are the raw inputs)."""
        assert self.prediction_log is not None
        sampled = self.prediction_log.sample(config, len(work.rows))
        if not sampled:
            return
        starts = np.cumsum([0, *work.rows]).tolist()
        context = telemetry.current_context()
        records = []
        for index in sampled:
            lo, hi = starts[index], starts[index + 1]
            raw: dict[str, Any] = {}
            if config.monitoring is not None and config.monitoring.log_raw_inputs:
                raw = {name: tensor.data[lo:hi] for name, tensor in inputs.items()}
            segment = work.segments[index]
            records.append(LoggedRequest(segment.id, (lo, hi), {}, {}, context, raw, segment.tenant))
        self.prediction_log.record(config, model.version, records, model.outputs)

    async def load_feature_defaults(self, timeout_s: float = 2.0) -> bool:
        try:
            self.feature_defaults = await self.features.defaults(Deadline.after(timeout_s))
        except DomainError:
            log.warning("feature defaults not loaded yet; will retry")
            return False
        return True

    async def fetch_features(self, queries: Sequence[FeatureQuery], budget: Deadline) -> list[FeatureBlock]:
        """Read features within `budget` (retried within it), through the feature store's circuit breaker:
        Unavailable at once while it is open."""
        breaker = self.feature_breaker
        if not breaker.allow():
            metrics.SHORT_CIRCUITED.labels("feature_service").inc()
            raise Unavailable("the feature store is not answering (circuit open)")

        async def read() -> list[FeatureBlock]:
            try:
                return await self.features.read(queries, budget)
            except (Unavailable, Overloaded) as error:
                metrics.RETRIES.labels("feature_service", type(error).__name__).inc()
                raise

        retry = self.retry
        try:
            blocks = await with_retries(
                read,
                budget,
                retry.max_attempts,
                retry.backoff_initial_s,
                retry.backoff_max_s,
                budget=self.feature_retries,
            )
        except (Unavailable, Overloaded, DeadlineExceeded):
            breaker.failure()
            raise
        except BaseException:
            breaker.release()  # cancelled, or refused as invalid: says nothing of the store's health
            raise
        breaker.success()
        return blocks

    async def call_model(
        self,
        name: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ) -> ModelAnswer:
        tried: set[str] = set()

        async def attempt() -> ModelAnswer:
            # Prefer a replica not tried yet; once all were, any (after backoff) beats failing early.
            untried = len(tried) < len(self.replicas.replicas)
            replica = self.replicas.choose(tried if untried else frozenset(), serving=(name, version))
            tried.add(replica.address)
            delay = self.hedging.delay() if len(self.replicas.replicas) > 1 else None
            if delay is None:
                return await self._call_replica(replica, name, version, inputs, deadline, timed, priority)
            return await self._hedged(replica, delay, tried, name, version, inputs, deadline, timed, priority)

        retry = self.retry
        return await with_retries(
            attempt,
            deadline,
            retry.max_attempts,
            retry.backoff_initial_s,
            retry.backoff_max_s,
            budget=self.model_retries,
        )

    async def _hedged(
        self,
        replica: Replica,
        delay_s: float,
        tried: set[str],
        name: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool,
        priority: int = DEFAULT_PRIORITY,
    ) -> ModelAnswer:
        """The call on `replica`; if it has not answered after `delay_s`, a copy on another replica too (within the
        hedge budget). The first answer wins and the other call is cancelled (its replica drops the request from
        its queue); if one fails, the other still may answer."""
        first = asyncio.ensure_future(self._call_replica(replica, name, version, inputs, deadline, timed, priority))
        calls = [first]
        try:
            done, _ = await asyncio.wait(calls, timeout=delay_s)
            if done or deadline.remaining() <= 0:
                return await first
            try:
                other = self.replicas.choose(tried | {replica.address}, serving=(name, version))
            except Unavailable:
                return await first
            if not self.hedging.spend():
                return await first
            tried.add(other.address)
            metrics.HEDGES.labels("model_service").inc()
            second = asyncio.ensure_future(self._call_replica(other, name, version, inputs, deadline, timed, priority))
            calls.append(second)
            pending = set(calls)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for call in done:
                    if call.exception() is None:
                        if call is second:
                            metrics.HEDGES_WON.labels("model_service").inc()
                        return call.result()
            return first.result()  # both failed: the first call's error (raises)
        finally:
            for call in calls:  # the loser, or both when this caller was cancelled
                if not call.done():
                    call.cancel()

    async def _call_replica(
        self,
        replica: Replica,
        name: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool,
        priority: int = DEFAULT_PRIORITY,
    ) -> ModelAnswer:
        replica.inflight += 1
        started = time.monotonic()
        try:
            if priority == DEFAULT_PRIORITY:  # as most calls are: the client's signature without it
                result: ModelAnswer = await replica.client.infer(name, version, inputs, deadline, timed)
            else:
                result = await replica.client.infer(name, version, inputs, deadline, timed, priority)
        except Unavailable:
            self.replicas.report_failure(replica)
            metrics.RETRIES.labels("model_service", "UNAVAILABLE").inc()
            raise
        except Overloaded:
            metrics.RETRIES.labels("model_service", "RESOURCE_EXHAUSTED").inc()
            raise
        finally:
            replica.inflight -= 1
        result.seconds = time.monotonic() - started
        self.replicas.report_success(replica, result.seconds)
        self.hedging.observe(result.seconds)
        return result

    async def close(self) -> None:
        for coalescer in self._coalescers.values():
            await coalescer.close()
        for task in list(self._mirror_tasks):  # mirrors and rollbacks being recorded: nobody waits for them
            task.cancel()


def feature_breaker_changed(state: BreakerState) -> None:
    """The feature store's breaker changed state: the gauge and one log line say so."""
    metrics.CIRCUIT_OPEN.labels("feature_service").set(0 if state == BreakerState.CLOSED else 1)
    log.warning("circuit breaker", extra={"fields": {"dependency": "feature_service", "state": state.name}})


def _model_timing(model: ModelAnswer) -> dict[str, str]:
    """The model service's parts of a request's time, and the transport around them."""
    spent = dict(model.timing)
    spent[timing.TRANSPORT] = timing.ms(model.seconds - timing.seconds_of(spent))
    return spent


def _add_router_time(results: list[SegmentResult], timed: list[bool], started: float) -> None:
    """The router's own share of each timed request: its time here less the parts measured below it."""
    elapsed = time.perf_counter() - started
    for result, wants_timing in zip(results, timed, strict=True):
        if wants_timing and result.error is None:
            result.flags[timing.ROUTER] = timing.ms(elapsed - timing.seconds_of(result.flags))


@dataclass(slots=True)
class _MirrorQueue:
    """Served batches waiting to be mirrored to one target, and the task sending them (one call at a time)."""

    items: deque[tuple[list[Tensor], dict[str, Tensor], int]] = field(default_factory=deque)
    rows: int = 0
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Joined:
    """A request of a coalesced batch whose features joined: its flags and where its rows start."""

    pending: Pending
    flags: dict[str, str]
    lo: int


class _ModelCoalescer(Coalescer):
    """A model version's coalescer, with the config its batches are built for."""

    def __init__(self, config: ModelConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config


@dataclass(slots=True)
class _Work:
    """The segments of a request batch to answer, and what every answer needs."""

    entry: ModelEntry
    output_names: list[str]
    segments: list[Segment]
    rows: list[int]
    timed: list[bool]
    deadline: Deadline

    def subset(self, indexes: Sequence[int]) -> _Work:
        return _Work(
            self.entry,
            self.output_names,
            [self.segments[i] for i in indexes],
            [self.rows[i] for i in indexes],
            [self.timed[i] for i in indexes],
            self.deadline,
        )


def _chunks(rows: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive segments grouped so that each group's rows stay within `limit` (each segment is within it)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for index, count in enumerate(rows):
        if chunks[-1] and total + count > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(index)
        total += count
    return chunks


def _version_failed(result: SegmentResult) -> bool:
    return result.error is not None and is_version_failure(result.error)


def _concatenate(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Segments' tensors as one batch (the first's, as they are, when there is one)."""
    if len(parts) == 1:
        return parts[0]
    joined: dict[str, Tensor] = {}
    for name, first in parts[0].items():
        data = np.concatenate([part[name].data for part in parts])
        joined[name] = Tensor(name, first.datatype, (len(data), *first.shape[1:]), data)
    return joined
