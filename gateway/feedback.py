"""Label feedback (`infermesh.feedback.v1.Feedback/ReportLabels`): the true outcome of earlier requests, joined to
their logged predictions and counted into each model version's online accuracy (gateway.online_accuracy).

Why at the gateway: it authenticates the caller, and only it can tell whose request an id was (the router records
the tenant the gateway passed it); it reads the prediction log's index by request id (infermesh.prediction_index)
in one pipelined round trip per call, so labels never cross another hop. Transport-free: gRPC is in
gateway.feedback_servicer, Redis behind `LabelIndex`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.auth import Tenant
from gateway.online_accuracy import OnlineAccuracy
from infermesh import metrics, prediction_index
from infermesh.dataplane import Call
from infermesh.errors import Code, InvalidInput, NotFound, PermissionDenied, Unavailable
from infermesh.model_config import ModelEntry
from infermesh.prediction_index import IndexedPrediction


@dataclass(frozen=True, slots=True)
class LabelReport:
    request_id: str
    label: float  # 0 or 1
    event_time_ms: int = 0  # when the outcome became known; 0: now


@dataclass(slots=True)
class LabelOutcome:
    code: Code = Code.OK
    message: str = ""
    model: str = ""
    version: str = ""


class LabelIndex(Protocol):
    async def lookup(self, request_ids: Sequence[str]) -> list[IndexedPrediction | None]: ...

    async def mark(self, labels: Sequence[tuple[str, float]]) -> list[int]: ...


class RedisLabelIndex:
    """The prediction log's index in its Redis (the router writes it, this reads and marks it)."""

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self.redis, self.stream = redis, stream

    async def lookup(self, request_ids: Sequence[str]) -> list[IndexedPrediction | None]:
        return await prediction_index.lookup(self.redis, self.stream, request_ids)

    async def mark(self, labels: Sequence[tuple[str, float]]) -> list[int]:
        return await prediction_index.mark_labelled(self.redis, self.stream, labels)

    async def close(self) -> None:
        await self.redis.aclose()


class Gateway(Protocol):
    """What feedback needs of the gateway's core: who calls, and the mesh's model configs (thresholds)."""

    def tenant(self, call: Call) -> Tenant: ...

    def router_models(self) -> dict[str, ModelEntry]: ...


class Feedback:
    def __init__(self, gateway: Gateway, index: LabelIndex, accuracy: OnlineAccuracy, max_labels: int = 1000) -> None:
        self.gateway = gateway
        self.index = index
        self.accuracy = accuracy
        self.max_labels = max_labels

    async def report_labels(self, call: Call, labels: Sequence[LabelReport]) -> tuple[int, list[LabelOutcome]]:
        """How many labels were joined, and each label's outcome. Raises PermissionDenied when any id is another
        tenant's request (nothing recorded), and the first label's error when none was joined."""
        tenant = self.gateway.tenant(call)
        if not 1 <= len(labels) <= self.max_labels:
            raise InvalidInput(f"a feedback call carries 1 to {self.max_labels} labels, got {len(labels)}")
        outcomes = [_checked(label) for label in labels]
        seen: set[str] = set()
        for label, outcome in zip(labels, outcomes, strict=True):
            if outcome.code == Code.OK and label.request_id in seen:
                outcome.code, outcome.message = Code.INVALID_ARGUMENT, f"request id '{label.request_id}' is repeated"
            seen.add(label.request_id)
        wanted = [i for i, outcome in enumerate(outcomes) if outcome.code == Code.OK]
        found = await self._lookup([labels[i].request_id for i in wanted])
        predictions: dict[int, IndexedPrediction] = {}
        for index, prediction in zip(wanted, found, strict=True):
            request_id = labels[index].request_id
            if prediction is None:
                outcomes[index] = _not_found(request_id)
            elif prediction.tenant != tenant.name or not tenant.allows(prediction.model):
                metrics.FEEDBACK_LABELS.labels("denied").inc()
                raise PermissionDenied(f"request id '{request_id}' is not a request of tenant '{tenant.name}'")
            elif prediction.rows != 1 or prediction.score is None:
                why = (
                    f"was a request of {prediction.rows} rows; labels are per single-row request"
                    if prediction.rows != 1
                    else f"has no numeric score (model '{prediction.model}')"
                )
                outcomes[index] = LabelOutcome(Code.INVALID_ARGUMENT, f"request id '{request_id}' {why}")
            else:
                predictions[index] = prediction
                outcomes[index].model, outcomes[index].version = prediction.model, prediction.version
        joined = await self._join(labels, outcomes, predictions)
        for outcome in outcomes:
            metrics.FEEDBACK_LABELS.labels(_RESULTS[outcome.code]).inc()
        if not any(outcome.code in (Code.OK, Code.ALREADY_EXISTS) for outcome in outcomes):
            first = outcomes[0]
            raise (NotFound if first.code == Code.NOT_FOUND else InvalidInput)(first.message)
        return joined, outcomes

    async def _lookup(self, request_ids: list[str]) -> list[IndexedPrediction | None]:
        if not request_ids:
            return []
        try:
            return await self.index.lookup(request_ids)
        except (RedisError, OSError):
            raise Unavailable("the prediction log is unavailable; report the labels again later") from None

    async def _join(
        self, labels: Sequence[LabelReport], outcomes: list[LabelOutcome], predictions: dict[int, IndexedPrediction]
    ) -> int:
        """Mark each prediction labelled (a label counts once) and count the new ones into the windows."""
        if not predictions:
            return 0
        order = list(predictions)
        try:
            marks = await self.index.mark([(labels[i].request_id, labels[i].label) for i in order])
        except (RedisError, OSError):
            raise Unavailable("the prediction log is unavailable; report the labels again later") from None
        now = time.time()
        models = self.gateway.router_models()
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for index, mark in zip(order, marks, strict=True):
            if mark == prediction_index.GONE:
                outcomes[index] = _not_found(labels[index].request_id)
            elif mark == prediction_index.LABELLED_BEFORE:
                outcomes[index].code = Code.ALREADY_EXISTS
                outcomes[index].message = f"request id '{labels[index].request_id}' was labelled before; counted once"
            else:
                prediction = predictions[index]
                groups[(prediction.model, prediction.version)].append(index)
        for (model, version), indexes in groups.items():
            entry = models.get(model)
            threshold = entry.config.threshold if entry is not None else 0.5
            scores = [predictions[i].score or 0.0 for i in indexes]
            self.accuracy.add(model, version, [labels[i].label for i in indexes], scores, threshold, now)
            delay = metrics.LABEL_DELAY.labels(model, version)
            for i in indexes:
                event_ms = labels[i].event_time_ms or now * 1000
                delay.observe(max(0.0, (event_ms - predictions[i].time_ms) / 1000))
        return sum(len(indexes) for indexes in groups.values())


_RESULTS = {
    Code.OK: "joined",
    Code.NOT_FOUND: "not_found",
    Code.ALREADY_EXISTS: "labelled_before",
    Code.INVALID_ARGUMENT: "invalid",
}


def _checked(label: LabelReport) -> LabelOutcome:
    if not prediction_index.indexable(label.request_id):
        return LabelOutcome(
            Code.INVALID_ARGUMENT, f"a request id must have 1 to {prediction_index.MAX_ID_CHARS} characters"
        )
    if label.label not in (0.0, 1.0):
        return LabelOutcome(Code.INVALID_ARGUMENT, f"label of request id '{label.request_id}' must be 0 or 1")
    if label.event_time_ms < 0:
        return LabelOutcome(Code.INVALID_ARGUMENT, f"event_time_ms of request id '{label.request_id}' is negative")
    return LabelOutcome()


def _not_found(request_id: str) -> LabelOutcome:
    return LabelOutcome(
        Code.NOT_FOUND,
        f"no logged prediction has request id '{request_id}' (only sampled predictions are logged, for a while)",
    )
