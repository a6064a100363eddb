"""The model repository: `<repo>/<model>/config.json` plus `<repo>/<model>/<version>/model.pt[.sha256]`.

One config serves every hop: the gateway validates against the public signature (`inputs`/`outputs`,
`max_batch_size`), the router joins features per `feature_spec` into `model_input`, and the model service
batches and runs the TorchScript file of each version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infermesh.errors import InvalidInput, NotFound
from infermesh.tensors import DATATYPES

MODEL_FILE = "model.pt"
MAX_ENTITY_ID_BYTES = 256  # the longest entity id a feature lookup accepts

log = logging.getLogger(__name__)


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension; the first is the batch dimension.")
    max_element_bytes: int | None = Field(
        None, ge=0, description="BYTES only: the longest element accepted (entity id inputs: 256 unless set)."
    )

    @model_validator(mode="after")
    def _known_datatype(self) -> TensorSpec:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor '{self.name}': unknown datatype {self.datatype}")
        return self


class DynamicBatching(BaseModel):
    enabled: bool = True
    max_queue_delay_us: int = Field(500, ge=0, description="Longest a request waits for others to join it.")
    max_queue_size: int = Field(1024, ge=1, description="Requests queued beyond this are refused at once.")


class EntityFeatures(BaseModel):
    """Features of one feature view, looked up by the ids in one BYTES input."""

    input: str
    view: str
    features: list[str]


class FeatureSpec(BaseModel):
    entities: list[EntityFeatures]
    request_inputs: list[str] = Field(
        default_factory=list, description="Numeric inputs appended as columns after the looked-up features."
    )
    on_missing: Literal["default", "reject"] = Field(
        "default", description="Unknown entity: use the view's defaults (and say so) or reject the request."
    )

    @property
    def width(self) -> int:
        return sum(len(entity.features) for entity in self.entities) + len(self.request_inputs)


class ModelConfig(BaseModel):
    name: str
    platform: str = "pytorch_torchscript"
    max_batch_size: int = Field(256, ge=1)
    dynamic_batching: DynamicBatching = Field(default_factory=DynamicBatching)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_spec: FeatureSpec | None = None
    model_input: TensorSpec | None = Field(
        None, description="With a feature_spec: the joined tensor the model service receives."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.feature_spec is not None:
            names = {spec.name for spec in self.inputs}
            wanted = [e.input for e in self.feature_spec.entities] + self.feature_spec.request_inputs
            missing = [n for n in wanted if n not in names]
            if missing:
                raise ValueError(f"model {self.name}: feature_spec names unknown inputs {missing}")
            if self.model_input is None:
                raise ValueError(f"model {self.name}: a feature_spec needs model_input")
            if self.model_input.shape[-1] != self.feature_spec.width:
                raise ValueError(f"model {self.name}: model_input width != feature_spec width")
        return self

    @cached_property
    def served_inputs(self) -> list[TensorSpec]:
        """What the model service itself accepts."""
        return [self.model_input] if self.model_input is not None else list(self.inputs)

    @cached_property
    def element_limits(self) -> dict[str, int]:
        """The longest BYTES element each public input accepts, checked while decoding (before any copy)."""
        limits = {s.name: s.max_element_bytes for s in self.inputs if s.max_element_bytes is not None}
        for entity in self.feature_spec.entities if self.feature_spec is not None else ():
            limits.setdefault(entity.input, MAX_ENTITY_ID_BYTES)
        return limits

    def select_outputs(self, requested: Sequence[str]) -> list[TensorSpec]:
        """The outputs a request asked for, in its order (all, in declared order, when it named none)."""
        if not requested:
            return list(self.outputs)
        by_name = {spec.name: spec for spec in self.outputs}
        selected = []
        for name in requested:
            spec = by_name.get(name)
            if spec is None:
                raise InvalidInput(f"requested output '{name}' is not an output of model '{self.name}'")
            selected.append(spec)
        return selected


class ModelEntry(BaseModel):
    """A model found in the repository, with its ready versions (ascending)."""

    config: ModelConfig
    path: Path
    versions: list[str]

    @property
    def latest(self) -> str:
        """Newest version, or "" (the model service's choice) where this hop sees no version folders."""
        return self.versions[-1] if self.versions else ""

    def resolve_version(self, requested: str) -> str:
        if not requested or not self.versions:
            return requested or self.latest
        if requested not in self.versions:
            raise NotFound(f"model '{self.config.name}' has no version '{requested}'")
        return requested


def find_model(models: Mapping[str, ModelEntry], name: str) -> ModelEntry:
    """The model of that name, or NotFound."""
    entry = models.get(name)
    if entry is None:
        raise NotFound(f"model '{name}' not found")
    return entry


def load_repository(root: Path, require_weights: bool = False) -> dict[str, ModelEntry]:
    """Read every `<root>/<model>/config.json`. Versions are numeric folders (with weights, if required)."""
    models: dict[str, ModelEntry] = {}
    if not root.is_dir():
        return models
    for config_path in sorted(root.glob("*/config.json")):
        try:
            config = ModelConfig.model_validate(json.loads(config_path.read_text()))
        except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            # One broken model must not take the others down: refuse it, say why in the log.
            log.error("invalid model config %s: %s", config_path, error)
            continue
        folder = config_path.parent
        versions = sorted(
            (p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
            key=int,
        )
        if require_weights:
            versions = [v for v in versions if (folder / v / MODEL_FILE).is_file()]
        if versions or not require_weights:
            models[config.name] = ModelEntry(config=config, path=folder, versions=versions)
    return models
