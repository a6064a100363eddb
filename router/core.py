"""The router's transport-free core: model lookup, feature join, coalescing, retries across replicas.

Downstream services are reached through two small client protocols (implemented over gRPC in
`router.clients`), so this module imports no transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from infermesh import metrics, telemetry
from infermesh.coalescer import Coalescer, Pending
from infermesh.errors import DomainError, InvalidInput, NotFound, Overloaded, Unavailable
from infermesh.model_config import ModelEntry, TensorSpec
from infermesh.retry import with_retries
from infermesh.segments import SegmentResult, parse_rows, split_tensors
from infermesh.tensors import Tensor
from infermesh.validation import entity_ids, require_finite, validate_inputs
from router.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)

# Mirrors infermesh.features.v1.FeatureStatus.
PRESENT, NOT_FOUND, STALE = 1, 2, 3


@dataclass(frozen=True, slots=True)
class FeatureQuery:
    view: str
    entity_ids: list[str]
    feature_names: list[str]


@dataclass(frozen=True, slots=True)
class FeatureBlock:
    values: np.ndarray  # float32 [entities, features]; defaults where NOT_FOUND
    statuses: np.ndarray  # uint8 [entities, features]


class FeatureReader(Protocol):
    async def read(self, queries: Sequence[FeatureQuery], timeout_s: float) -> list[FeatureBlock]: ...

    async def defaults(self, timeout_s: float) -> dict[str, dict[str, float]]:
        """Each view's default value per feature (from the feature registry)."""
        ...


class ModelClient(Protocol):
    async def infer(
        self, model: str, version: str, inputs: Sequence[Tensor], timeout_s: float
    ) -> tuple[str, dict[str, Tensor]]: ...


@dataclass(slots=True)
class InferResult:
    model: str
    version: str
    outputs: list[Tensor]
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_initial_s: float = 0.002
    backoff_max_s: float = 0.05


@dataclass(slots=True)
class _FeatureRequest:
    """A feature-joined request inside a coalesced batch."""

    tensors: dict[str, Tensor]
    ids: dict[str, list[str]]


class RouterCore:
    def __init__(
        self,
        models: dict[str, ModelEntry],
        replicas: ReplicaSet,
        features: FeatureReader,
        retry: RetryPolicy,
        default_timeout_s: float = 10.0,
        max_batch_rows: int = 1024,
        max_inflight_batches: int = 4,
        max_pending_requests: int = 4096,
    ) -> None:
        self.models = models
        self.replicas = replicas
        self.features = features
        self.retry = retry
        self.default_timeout_s = default_timeout_s
        # view → feature → default, for serving policy-'default' models while the feature store is down.
        self.feature_defaults: dict[str, dict[str, float]] = {}
        self._max_batch_rows = max_batch_rows
        self._max_inflight_batches = max_inflight_batches
        self._max_pending_requests = max_pending_requests
        # One coalescer per (model, version): only requests for the same model version share a batch.
        self._coalescers: dict[tuple[str, str], Coalescer] = {}

    # -- lookups ---------------------------------------------------------------------------------
    def model(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' not found")
        return entry

    def model_ready(self, name: str, version: str) -> bool:
        entry = self.models.get(name)
        if entry is None:
            return False
        if version and entry.versions and version not in entry.versions:
            return False
        return self.replicas.up_count > 0

    def ready(self) -> bool:
        return self.replicas.up_count > 0

    def deadline(self, time_remaining_s: float | None) -> float:
        budget = self.default_timeout_s if time_remaining_s is None else min(time_remaining_s, self.default_timeout_s)
        return time.monotonic() + budget

    # -- inference -------------------------------------------------------------------------------
    async def infer(
        self,
        name: str,
        version: str,
        tensors: dict[str, Tensor],
        requested_outputs: Sequence[str],
        deadline: float,
    ) -> InferResult:
        entry, version, output_specs, rows = self._checked(name, version, tensors, requested_outputs)
        config = entry.config
        if config.feature_spec is None:
            served, outputs = await self.call_model(name, version, list(tensors.values()), deadline)
            return InferResult(name, served, [outputs[s.name] for s in output_specs if s.name in outputs])
        pending = self._pending(entry, tensors, rows, deadline)
        served, outputs, parameters = await self._coalescer(entry, version).submit(pending)
        return InferResult(name, served, [outputs[s.name] for s in output_specs], parameters)

    async def infer_segments(
        self,
        name: str,
        version: str,
        tensors: dict[str, Tensor],
        requested_outputs: Sequence[str],
        deadline: float,
        segments: str,
    ) -> tuple[str, list[str], list[SegmentResult]]:
        """Several clients' requests merged by the gateway (infermesh.segments): each segment succeeds or
        fails on its own, as if sent alone. `segments` is the request parameter naming each one's rows.
        Returns the served version, the output names and the results."""
        entry, version, output_specs, batch_rows = self._checked(name, version, tensors, requested_outputs)
        segment_rows = parse_rows(segments, batch_rows)
        config = entry.config
        output_names = [s.name for s in output_specs]
        parts = split_tensors(tensors, segment_rows)
        if config.feature_spec is None:
            served, outputs = await self.call_model(name, version, list(tensors.values()), deadline)
            results, row = [], 0
            for rows in segment_rows:
                sliced = [_rows(outputs[n], row, row + rows) for n in output_names if n in outputs]
                results.append(SegmentResult(rows, sliced))
                row += rows
            return served, output_names, results
        results: list[SegmentResult | None] = []
        pendings: list[Pending] = []
        for part, rows in zip(parts, segment_rows, strict=True):
            try:
                pendings.append(self._pending(entry, part, rows, deadline))
                results.append(None)
            except DomainError as error:
                results.append(SegmentResult(rows, error=error))
        answers = iter(await self._coalescer(entry, version).submit_many(pendings) if pendings else ())
        served = version
        for index, rows in enumerate(segment_rows):
            if results[index] is not None:
                continue
            answer = next(answers)
            if isinstance(answer, DomainError):
                results[index] = SegmentResult(rows, error=answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                served, outputs, parameters = answer
                results[index] = SegmentResult(rows, [outputs[n] for n in output_names], parameters)
        return served, output_names, [r for r in results if r is not None]

    def _checked(
        self, name: str, version: str, tensors: dict[str, Tensor], requested_outputs: Sequence[str]
    ) -> tuple[ModelEntry, str, list[TensorSpec], int]:
        """The model entry, the version to serve, the outputs to return and the batch's rows; or the error."""
        entry = self.model(name)
        config = entry.config
        version = entry.resolve_version(version)
        output_specs = _select_outputs(config.name, config.outputs, requested_outputs)
        rows = validate_inputs(config.name, config.inputs, config.max_batch_size, tensors)
        return entry, version, output_specs, rows

    def _pending(self, entry: ModelEntry, tensors: dict[str, Tensor], rows: int, deadline: float) -> Pending:
        spec = entry.config.feature_spec
        assert spec is not None
        ids = {entity.input: entity_ids(tensors[entity.input]) for entity in spec.entities}
        for request_input in spec.request_inputs:
            require_finite(tensors[request_input])
        return Pending(_FeatureRequest(tensors, ids), rows, deadline)

    def _coalescer(self, entry: ModelEntry, version: str) -> Coalescer:
        key = (entry.config.name, version)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            coalescer = self._coalescers[key] = Coalescer(
                "router",
                entry.config.name,
                self._batch_runner(entry, version),
                max_rows=min(self._max_batch_rows, entry.config.max_batch_size),
                max_inflight=self._max_inflight_batches,
                max_pending=self._max_pending_requests,
            )
        return coalescer

    def _batch_runner(self, entry: ModelEntry, version: str):
        config = entry.config
        spec = config.feature_spec
        assert spec is not None and config.model_input is not None
        model_input = config.model_input
        on_missing_reject = spec.on_missing == "reject"
        defaulted_counter = metrics.FEATURE_DEFAULTED.labels(config.name)
        fetch_latency = metrics.FEATURE_FETCH_LATENCY.labels(config.name)

        async def run(batch: list[Pending]) -> None:
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            deadline = max(p.deadline for p in batch)
            requests: list[_FeatureRequest] = [p.payload for p in batch]
            queries: list[FeatureQuery] = []
            row_index: list[np.ndarray] = []
            for entity in spec.entities:
                all_ids = [entity_id for request in requests for entity_id in request.ids[entity.input]]
                unique = list(dict.fromkeys(all_ids))
                position = {entity_id: i for i, entity_id in enumerate(unique)}
                row_index.append(np.fromiter((position[i] for i in all_ids), dtype=np.intp, count=len(all_ids)))
                queries.append(FeatureQuery(entity.view, unique, entity.features))
            started = time.perf_counter()
            features_unavailable = False
            with telemetry.span("router.feature_fetch", model=config.name, entities=len(row_index[0])):
                try:
                    blocks = await self.fetch_features(queries, deadline)
                except Unavailable:
                    # Policy 'default' keeps answering (flagged) through a feature store outage;
                    # 'reject' fails fast.
                    fallback = None if on_missing_reject else self.default_blocks(queries)
                    if fallback is None:
                        raise
                    blocks, features_unavailable = fallback, True
            fetch_latency.observe(time.perf_counter() - started)

            columns: list[np.ndarray] = []
            missing_rows = np.zeros(len(row_index[0]), dtype=bool)
            stale_rows = np.zeros_like(missing_rows)
            missing_by_entity: list[np.ndarray] = []
            for block, index in zip(blocks, row_index, strict=True):
                columns.append(block.values[index])
                missing = (block.statuses == NOT_FOUND).any(axis=1)[index]
                missing_by_entity.append(missing)
                missing_rows |= missing
                stale_rows |= (block.statuses == STALE).any(axis=1)[index]
            for request_input in spec.request_inputs:
                columns.append(
                    np.concatenate([r.tensors[request_input].data.reshape(-1, 1) for r in requests]).astype(
                        np.float32, copy=False
                    )
                )
            joined = np.concatenate(columns, axis=1)

            # Per-request bookkeeping: row offsets, unknown entities (reject / flag), stale flags.
            offsets = np.cumsum([0] + [p.rows for p in batch])
            keep = np.ones(len(joined), dtype=bool)
            parameters: list[dict[str, str]] = [{} for _ in batch]
            if missing_rows.any() or stale_rows.any():
                for i, (pending, request) in enumerate(zip(batch, requests, strict=True)):
                    lo, hi = offsets[i], offsets[i + 1]
                    unknown = _describe(spec.entities, request.ids, missing_by_entity, lo, hi)
                    if unknown and on_missing_reject:
                        keep[lo:hi] = False
                        if not pending.future.done():
                            pending.future.set_exception(NotFound(f"unknown entity {unknown[0]}"))
                        continue
                    if unknown:
                        defaulted_counter.inc()
                        parameters[i]["infermesh_defaulted_entities"] = ",".join(unknown)
                    if features_unavailable:
                        parameters[i]["infermesh_features_unavailable"] = "true"
                    if stale_rows[lo:hi].any():
                        parameters[i]["infermesh_stale_rows"] = ",".join(
                            str(r - lo) for r in range(lo, hi) if stale_rows[r]
                        )
            if not keep.all():
                live = [i for i in range(len(batch)) if keep[offsets[i]]]
                if not live:
                    return
                joined = joined[keep]
                batch = [batch[i] for i in live]
                parameters = [parameters[i] for i in live]
                offsets = np.cumsum([0] + [p.rows for p in batch])
            features = Tensor(model_input.name, "FP32", (len(joined), joined.shape[1]), joined)
            served, outputs = await self.call_model(config.name, version, [features], deadline)
            for i, pending in enumerate(batch):
                if pending.future.done():
                    continue
                lo, hi = offsets[i], offsets[i + 1]
                sliced = {name: _rows(t, lo, hi) for name, t in outputs.items()}
                pending.future.set_result((served, sliced, parameters[i]))

        return run

    def default_blocks(self, queries: Sequence[FeatureQuery]) -> list[FeatureBlock] | None:
        """Every entity NOT_FOUND with the views' defaults; None when a default is unknown."""
        blocks = []
        for query in queries:
            view_defaults = self.feature_defaults.get(query.view)
            if view_defaults is None or any(name not in view_defaults for name in query.feature_names):
                return None
            row = np.array([view_defaults[name] for name in query.feature_names], dtype=np.float32)
            shape = (len(query.entity_ids), len(row))
            blocks.append(FeatureBlock(np.broadcast_to(row, shape), np.full(shape, NOT_FOUND, dtype=np.uint8)))
        return blocks

    async def load_feature_defaults(self, timeout_s: float = 2.0) -> bool:
        try:
            self.feature_defaults = await self.features.defaults(timeout_s)
        except (Unavailable, Overloaded, DomainError):
            log.warning("feature defaults not loaded yet; will retry")
            return False
        return True

    async def fetch_features(self, queries: Sequence[FeatureQuery], deadline: float) -> list[FeatureBlock]:
        async def read() -> list[FeatureBlock]:
            try:
                return await self.features.read(queries, _remaining(deadline))
            except (Unavailable, Overloaded) as error:
                metrics.RETRIES.labels("feature_service", type(error).__name__).inc()
                raise

        retry = self.retry
        return await with_retries(read, deadline, retry.max_attempts, retry.backoff_initial_s, retry.backoff_max_s)

    async def call_model(
        self, name: str, version: str, inputs: Sequence[Tensor], deadline: float
    ) -> tuple[str, dict[str, Tensor]]:
        tried: set[str] = set()

        async def attempt() -> tuple[str, dict[str, Tensor]]:
            # Prefer a replica not tried yet; once all were, any (after backoff) beats failing early.
            untried = len(tried) < len(self.replicas.replicas)
            replica = self.replicas.choose(tried if untried else frozenset())
            tried.add(replica.address)
            return await self._call_replica(replica, name, version, inputs, deadline)

        retry = self.retry
        return await with_retries(attempt, deadline, retry.max_attempts, retry.backoff_initial_s, retry.backoff_max_s)

    async def _call_replica(
        self, replica: Replica, name: str, version: str, inputs: Sequence[Tensor], deadline: float
    ) -> tuple[str, dict[str, Tensor]]:
        replica.inflight += 1
        started = time.monotonic()
        try:
            result = await replica.client.infer(name, version, inputs, _remaining(deadline))
        except Unavailable:
            self.replicas.report_failure(replica)
            metrics.RETRIES.labels("model_service", "UNAVAILABLE").inc()
            raise
        except Overloaded:
            metrics.RETRIES.labels("model_service", "RESOURCE_EXHAUSTED").inc()
            raise
        finally:
            replica.inflight -= 1
        self.replicas.report_success(replica, time.monotonic() - started)
        return result

    async def close(self) -> None:
        for coalescer in self._coalescers.values():
            await coalescer.close()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _rows(tensor: Tensor, lo: int, hi: int) -> Tensor:
    return Tensor(tensor.name, tensor.datatype, (hi - lo, *tensor.shape[1:]), tensor.data[lo:hi])


def _select_outputs(model: str, outputs: list[TensorSpec], requested: Sequence[str]) -> list[TensorSpec]:
    if not requested:
        return outputs
    by_name = {spec.name: spec for spec in outputs}
    selected = []
    for name in requested:
        if name not in by_name:
            raise InvalidInput(f"requested output '{name}' is not an output of model '{model}'")
        selected.append(by_name[name])
    return selected


def _describe(entities, ids: dict[str, list[str]], missing_by_entity, lo: int, hi: int) -> list[str]:
    """Names of this request's unknown entities, e.g. "user_id=u123" (ids are the client's own data)."""
    found: list[str] = []
    for entity, missing in zip(entities, missing_by_entity, strict=True):
        request_ids = ids[entity.input]
        for row in range(lo, hi):
            if missing[row]:
                found.append(f"{entity.input}={request_ids[row - lo]}")
    return list(dict.fromkeys(found))
