"""The feature view registry: which features each view stores, their order, defaults and freshness bound.

A view's feature order is the order of the stored float32 vector, so features may only be appended to a
view; removing or reordering one needs a new view name (stored vectors would be read misaligned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

# No ':' in view names: it separates the parts of a Redis key, so keys stay unambiguous.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"


class FeatureDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Feature name, unique within its view.")
    default: float = Field(0.0, description="Value served when the entity has no value for this feature.")
    description: str = Field("", description="What the feature measures, for humans.")


class FeatureView(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="View name, unique in the registry.")
    entity_key: str = Field(min_length=1, description="Name of the entity id the view is keyed by (e.g. user_id).")
    max_age_ms: int = Field(0, ge=0, description="Values older than this are served as STALE; 0: never stale.")
    features: list[FeatureDefinition] = Field(min_length=1, description="In stored vector order.")

    _names: tuple[str, ...] = PrivateAttr()
    _index: dict[str, int] = PrivateAttr()
    _defaults: np.ndarray = PrivateAttr()

    @model_validator(mode="after")
    def _unique_features(self) -> FeatureView:
        names = [feature.name for feature in self.features]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"feature view '{self.name}': duplicate features {duplicates}")
        return self

    def model_post_init(self, context: Any, /) -> None:
        # Precomputed once: the read path only indexes these.
        self._names = tuple(feature.name for feature in self.features)
        self._index = {name: position for position, name in enumerate(self._names)}
        defaults = np.array([feature.default for feature in self.features], dtype=np.float32)
        defaults.flags.writeable = False
        self._defaults = defaults

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def index(self) -> dict[str, int]:
        """Feature name → position in the stored vector."""
        return self._index

    @property
    def defaults(self) -> np.ndarray:
        """float32 [F], read-only."""
        return self._defaults

    @property
    def width(self) -> int:
        return len(self._names)


class FeatureViewRegistry(BaseModel):
    """The registry file: `{"views": [...]}`."""

    model_config = ConfigDict(extra="forbid")

    views: list[FeatureView]

    @model_validator(mode="after")
    def _unique_views(self) -> FeatureViewRegistry:
        names = [view.name for view in self.views]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate feature views {duplicates}")
        return self


def parse_views(data: Any) -> dict[str, FeatureView]:
    registry = FeatureViewRegistry.model_validate(data)
    return {view.name: view for view in registry.views}


def load_views(path: Path) -> dict[str, FeatureView]:
    """Read and validate the registry file; raises on a missing file or an invalid registry."""
    return parse_views(json.loads(Path(path).read_text()))
