"""The router's feature join, pure: plan the feature queries of a batch of requests, join the blocks that answer
them into the model's input, apply the model's missing-entity and stale-value policies and write each request's
flags.

A batch is one or more requests (a plain request is a batch of one); each keeps its own rows, its own flags,
and under `on_missing: reject` or `on_stale: reject` its own error, so one unknown entity or stale value never
fails its neighbours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from infermesh.errors import DomainError, FailedPrecondition, NotFound, Unavailable
from infermesh.features import (
    DEFAULTED_ENTITIES,
    FEATURE_AGES_MS,
    FEATURES_UNAVAILABLE,
    STALE_DEFAULTED_ROWS,
    STALE_ROWS,
    FeatureBlock,
    FeatureQuery,
    FeatureStatus,
)
from infermesh.model_config import EntityFeatures, FeatureSpec
from infermesh.tensors import Tensor
from infermesh.validation import entity_ids, require_finite

_NOT_FOUND = np.uint8(FeatureStatus.NOT_FOUND)
_STALE = np.uint8(FeatureStatus.STALE)


@dataclass(slots=True)
class JoinRequest:
    """One request's part of a join: its entity ids per entity input and its numeric request inputs."""

    rows: int
    ids: dict[str, list[str]]  # entity input → one id per row
    request_inputs: list[np.ndarray]  # [rows] float32 each, in feature_spec.request_inputs order
    timed: bool = False  # the client asked for per-hop timing
    ages: bool = False  # the client asked for the age of the features served
    request_id: str = ""  # the client's request id (the prediction log keys its record by it)
    version: str = ""  # the model version that answers it (requests for several versions share a feature read)
    tenant: str = ""  # the tenant the gateway authenticated (the prediction log records it)


def join_request(
    spec: FeatureSpec, tensors: Mapping[str, Tensor], rows: int, timed: bool = False, ages: bool = False
) -> JoinRequest:
    """A validated request's join inputs; InvalidInput for a bad entity id or a non-finite number."""
    ids = {entity.input: entity_ids(tensors[entity.input]) for entity in spec.entities}
    numbers = []
    for name in spec.request_inputs:
        tensor = tensors[name]
        require_finite(tensor)
        numbers.append(tensor.data.reshape(-1))
    return JoinRequest(rows, ids, numbers, timed, ages)


@dataclass(slots=True)
class JoinPlan:
    queries: list[FeatureQuery]  # one per entity, each entity id once
    row_index: list[np.ndarray]  # per entity: for each row of the batch, its entity's row in the query's block

    @property
    def rows(self) -> int:
        return len(self.row_index[0]) if self.row_index else 0


def plan(spec: FeatureSpec, requests: Sequence[JoinRequest]) -> JoinPlan:
    queries: list[FeatureQuery] = []
    row_index: list[np.ndarray] = []
    for entity in spec.entities:
        all_ids = [entity_id for request in requests for entity_id in request.ids[entity.input]]
        unique = list(dict.fromkeys(all_ids))
        position = {entity_id: i for i, entity_id in enumerate(unique)}
        row_index.append(np.fromiter((position[i] for i in all_ids), dtype=np.intp, count=len(all_ids)))
        queries.append(FeatureQuery(entity.view, unique, entity.features))
    return JoinPlan(queries, row_index)


def default_blocks(
    queries: Sequence[FeatureQuery], defaults: Mapping[str, Mapping[str, float]]
) -> list[FeatureBlock] | None:
    """Every entity NOT_FOUND with its view's defaults (serving through a feature store outage); None when a
    default is unknown."""
    blocks = []
    for query in queries:
        view_defaults = defaults.get(query.view)
        names = list(query.feature_names or ())
        if view_defaults is None or any(name not in view_defaults for name in names):
            return None
        row = np.array([view_defaults[name] for name in names], dtype=np.float32)
        shape = (len(query.entity_ids), len(row))
        blocks.append(
            FeatureBlock(
                query.view,
                tuple(names),
                np.broadcast_to(row, shape),
                np.full(shape, _NOT_FOUND, dtype=np.uint8),
                np.full(shape, -1, dtype=np.int64),
            )
        )
    return blocks


@dataclass(slots=True)
class Joined:
    """The model input of the requests that go on, and per request (in order) its flags or its error."""

    features: np.ndarray  # float32 [rows of the requests that go on, feature_spec.width]
    outcomes: list[dict[str, str] | DomainError] = field(default_factory=list)

    @property
    def kept(self) -> list[int]:
        """Indexes of the requests whose rows are in `features`, in order."""
        return [i for i, outcome in enumerate(self.outcomes) if not isinstance(outcome, DomainError)]


def _default_row(block: FeatureBlock, defaults: Mapping[str, Mapping[str, float]]) -> np.ndarray | None:
    view_defaults = defaults.get(block.view)
    if view_defaults is None or any(name not in view_defaults for name in block.feature_names):
        return None
    return np.array([view_defaults[name] for name in block.feature_names], dtype=np.float32)


def join(
    spec: FeatureSpec,
    requests: Sequence[JoinRequest],
    joined_plan: JoinPlan,
    blocks: Sequence[FeatureBlock],
    features_unavailable: bool = False,
    defaults: Mapping[str, Mapping[str, float]] | None = None,
) -> Joined:
    """`defaults` (view → feature → default) serve in place of stale values under `on_stale: default`."""
    columns: list[np.ndarray] = []
    rows = joined_plan.rows
    missing_rows = np.zeros(rows, dtype=bool)
    stale_rows = np.zeros_like(missing_rows)
    missing_by_entity: list[np.ndarray] = []
    stale_by_entity: list[np.ndarray] = []
    ages_by_entity: list[np.ndarray] = []
    ages_wanted = any(request.ages for request in requests)
    defaults_missing = False  # on_stale 'default' and a stale view whose defaults the router has not loaded
    for block, index in zip(blocks, joined_plan.row_index, strict=True):
        values = block.values
        stale_entities = (block.statuses == _STALE).any(axis=1)
        entity_ages = block.ages_ms.max(axis=1) if ages_wanted and block.ages_ms.size else None
        if spec.on_stale == "default" and stale_entities.any():
            default_row = _default_row(block, defaults or {})
            if default_row is None:
                defaults_missing = True
            else:
                values = np.where(stale_entities[:, None], default_row, values)
                if entity_ages is not None:
                    entity_ages = np.where(stale_entities, -1, entity_ages)
        columns.append(values[index])
        missing = (block.statuses == _NOT_FOUND).any(axis=1)[index]
        missing_by_entity.append(missing)
        missing_rows |= missing
        stale = stale_entities[index]
        stale_by_entity.append(stale)
        stale_rows |= stale
        if ages_wanted:
            ages_by_entity.append(
                np.full(rows, -1, dtype=np.int64) if entity_ages is None else entity_ages[index].astype(np.int64)
            )
    for position in range(len(spec.request_inputs)):
        column = np.concatenate([r.request_inputs[position] for r in requests]) if len(requests) > 1 else None
        values = requests[0].request_inputs[position] if column is None else column
        columns.append(values.reshape(-1, 1).astype(np.float32, copy=False))
    features = np.concatenate(columns, axis=1)

    outcomes: list[dict[str, str] | DomainError] = [{} for _ in requests]
    if not (missing_rows.any() or stale_rows.any() or ages_wanted):
        return Joined(features, outcomes)
    keep = np.ones(rows, dtype=bool)
    lo = 0
    for i, request in enumerate(requests):
        hi = lo + request.rows
        unknown = _entities_where(spec.entities, request, missing_by_entity, lo, hi)
        stale_here = bool(stale_rows[lo:hi].any())
        if unknown and spec.on_missing == "reject":
            keep[lo:hi] = False
            outcomes[i] = NotFound(f"unknown entity {unknown[0]}")
        elif stale_here and spec.on_stale == "reject":
            keep[lo:hi] = False
            stale_entity = _entities_where(spec.entities, request, stale_by_entity, lo, hi)[0]
            outcomes[i] = FailedPrecondition(f"features of entity {stale_entity} are older than their view's max_age")
        elif stale_here and defaults_missing:
            keep[lo:hi] = False
            outcomes[i] = Unavailable("feature defaults are not loaded yet; stale features cannot be replaced")
        else:
            flags: dict[str, str] = {}
            if unknown:
                flags[DEFAULTED_ENTITIES] = ",".join(unknown)
            if features_unavailable:
                flags[FEATURES_UNAVAILABLE] = "true"
            if stale_here:
                stale_list = ",".join(str(r - lo) for r in range(lo, hi) if stale_rows[r])
                flags[STALE_DEFAULTED_ROWS if spec.on_stale == "default" else STALE_ROWS] = stale_list
            if request.ages:
                ages = {
                    entity.input: entity_ages[lo:hi].tolist()
                    for entity, entity_ages in zip(spec.entities, ages_by_entity, strict=True)
                }
                flags[FEATURE_AGES_MS] = json.dumps(ages, separators=(",", ":"))
            outcomes[i] = flags
        lo = hi
    return Joined(features if keep.all() else features[keep], outcomes)


def _entities_where(
    entities: Sequence[EntityFeatures], request: JoinRequest, masks: Sequence[np.ndarray], lo: int, hi: int
) -> list[str]:
    """Names of a request's entities flagged in `masks` (unknown, stale), e.g. "user_id=u123" (ids are the
    client's own data)."""
    found: list[str] = []
    for entity, mask in zip(entities, masks, strict=True):
        request_ids = request.ids[entity.input]
        for row in range(lo, hi):
            if mask[row]:
                found.append(f"{entity.input}={request_ids[row - lo]}")
    return list(dict.fromkeys(found))
