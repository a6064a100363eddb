"""The feature contract between the router and the feature service: a query, the block that answers it, the
status of each value, and the response flags a model's answer carries about its features.

Transport-free: `protos/feature_store.proto` is its wire form (`FeatureStatus` has the same numbers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np


class FeatureStatus(IntEnum):
    """Same numbers as the proto enum `infermesh.features.v1.FeatureStatus`."""

    UNSPECIFIED = 0
    PRESENT = 1
    NOT_FOUND = 2  # no row for the entity, or the row has no value for this feature
    STALE = 3  # present, but older than the view's max_age_ms


class FeatureQuery(NamedTuple):
    """One read of a batch: a plain `(view, entity_ids, feature_names)` tuple works as well."""

    view: str
    entity_ids: Sequence[str]
    feature_names: Sequence[str] | None = None  # None or empty: all of the view's, in declared order


@dataclass(slots=True)
class FeatureBlock:
    """The answer to one query: E entities by F features, row-major in the order asked."""

    view: str
    feature_names: tuple[str, ...]
    values: np.ndarray  # float32 [E, F]; NOT_FOUND values hold the feature's default
    statuses: np.ndarray  # uint8 [E, F]; FeatureStatus codes
    ages_ms: np.ndarray  # int64 [E, F]; -1 where NOT_FOUND


# Response parameters of a feature-joined answer (the router sets them; clients and bench/ read them).
DEFAULTED_ENTITIES = "infermesh_defaulted_entities"  # "user_id=u1,merchant_id=m9": served with view defaults
STALE_ROWS = "infermesh_stale_rows"  # "0,3": rows with a value older than the view's max_age
FEATURES_UNAVAILABLE = "infermesh_features_unavailable"  # "true": the feature store was down, defaults served
STALE_DEFAULTED_ROWS = "infermesh_stale_defaulted_rows"  # "0,3": rows whose stale values were replaced by defaults
# Ask for the age of the features served (request parameter, bool); the answer carries, as JSON, per entity input
# the age in ms of the vector served for each row (-1: not found or a default served instead).
FEATURE_AGES = "infermesh_feature_ages"
FEATURE_AGES_MS = "infermesh_feature_ages_ms"  # '{"user_id": [1200, -1], "merchant_id": [50, 50]}'


def ages_wanted(parameters: Mapping[str, object]) -> bool:
    value = parameters.get(FEATURE_AGES)
    return value is True or (isinstance(value, str) and value.lower() == "true")
