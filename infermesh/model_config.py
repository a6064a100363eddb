"""The model repository: `<repo>/<model>/config.json` plus `<repo>/<model>/<version>/model.pt[.sha256]`.

One config serves every hop: the gateway validates against the public signature (`inputs`/`outputs`,
`max_batch_size`), the router joins features per `feature_spec` into `model_input`, and the model service
batches and runs the TorchScript file of each version.

The config also pins each version's weights: `"version_digests": {"1": "sha256:<hex>"}`. The pin lives outside
the version folder, so whoever can replace a version's files (model.pt and its .sha256 sidecar together) cannot
make the model service accept them; `pin_version` writes it (demo training, `infermesh models publish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from infermesh.errors import InvalidInput, NotFound, Unavailable
from infermesh.tensors import DATATYPES

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
MAX_ENTITY_ID_BYTES = 256  # the longest entity id a feature lookup accepts
DIGEST_PREFIX = "sha256:"
_PINNED_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_VERSION = re.compile(r"[1-9][0-9]*")
MAX_PINNED_VERSIONS = 10_000

log = logging.getLogger(__name__)


MAX_LABELS = 100_000  # class labels of one output
MAX_LABEL_FILE_BYTES = 4 * 1024 * 1024


class TensorSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension; the first is the batch dimension.")
    max_element_bytes: int | None = Field(
        None, ge=0, description="BYTES only: the longest element accepted (entity id inputs: 256 unless set)."
    )
    label_filename: str | None = Field(
        None,
        description="Outputs: a file of the model's folder with one class label per line (Triton's), read into "
        "`labels` when the model is loaded.",
    )
    labels: list[str] | None = Field(
        None,
        max_length=MAX_LABELS,
        description="Outputs: the class label of each index, for Triton's classification extension "
        '("<value>:<index>:<label>").',
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
    on_stale: Literal["serve", "default", "reject"] = Field(
        "serve",
        description="A value older than its view's max_age: serve it (rows listed in infermesh_stale_rows), use the "
        "view's defaults instead (rows listed in infermesh_stale_defaulted_rows) or reject the request "
        "(FAILED_PRECONDITION naming the entity).",
    )
    timeout_ms: float = Field(
        100.0,
        gt=0,
        description="Budget of the feature read (the request's deadline if sooner). Past it, or while the feature "
        "store's circuit breaker is open, policy 'default' answers with the views' defaults (flagged) and 'reject' "
        "fails at once (UNAVAILABLE).",
    )

    @property
    def width(self) -> int:
        return sum(len(entity.features) for entity in self.entities) + len(self.request_inputs)

    @property
    def column_names(self) -> list[str]:
        """The joined vector's columns in order: each entity's features, then the request inputs."""
        return [name for entity in self.entities for name in entity.features] + list(self.request_inputs)


class LatestVersions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_versions: int = Field(1, ge=1)


class AllVersions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecificVersions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    versions: list[int] = Field(min_length=1)


class VersionPolicy(BaseModel):
    """Triton's `version_policy`: which of the version folders are served. None given: the newest one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    latest: LatestVersions | None = None
    all: AllVersions | None = None
    specific: SpecificVersions | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> VersionPolicy:
        if sum(choice is not None for choice in (self.latest, self.all, self.specific)) > 1:
            raise ValueError("version_policy: give one of latest, all, specific")
        return self

    def select(self, available: Sequence[str]) -> list[str]:
        """The versions to serve of those available (numeric folder names), ascending."""
        ordered = sorted(available, key=int)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            wanted = {str(version) for version in self.specific.versions}
            return [version for version in ordered if version in wanted]
        count = self.latest.num_versions if self.latest is not None else 1
        return ordered[-count:]


class Cascade(BaseModel):
    """Hybrid routing: the model answers first; a request whose `output` (the first output unless named) has a
    row inside the band is answered by the larger `model` instead, within the request's deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = Field(min_length=1)
    when_output_between: tuple[float, float]
    output: str = ""

    @model_validator(mode="after")
    def _band(self) -> Cascade:
        low, high = self.when_output_between
        if not low <= high:
            raise ValueError("cascade.when_output_between: [low, high] with low <= high")
        return self


class Guard(BaseModel):
    """Automatic rollback of a non-baseline version of the split whose figures over the last `window_s` break a
    limit, once it has served `min_requests` there. Divergence is measured on `compare_sample` of its requests,
    also sent to the baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window_s: float = Field(30.0, gt=0, le=3600)
    min_requests: int = Field(50, ge=1)
    max_error_ratio: float | None = Field(0.01, ge=0, le=1)
    max_p99_ms: float | None = Field(None, gt=0)
    max_divergence: float | None = Field(None, ge=0)
    compare_sample: float = Field(0.1, ge=0, le=1)


class Traffic(BaseModel):
    """Progressive delivery of a model's versions (router.traffic applies it): a weighted split (canary, A/B;
    sticky per value of an input when asked), shadow versions that get a mirror of the traffic and never answer,
    a cascade to a larger model, and a guard that rolls a failing version back to the baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    baseline: str
    split: dict[str, int] = Field(default_factory=dict)
    sticky_input: str = ""
    shadow: list[str] = Field(default_factory=list, max_length=4)
    shadow_sample: float = Field(1.0, ge=0, le=1, description="Share of the traffic mirrored to the shadows.")
    flip_threshold: float = Field(0.5, description="A score on one side of it in one answer, not in the other: a flip.")
    cascade: Cascade | None = None
    guard: Guard | None = None
    rolled_back: dict[str, str] = Field(
        default_factory=dict, description="Versions the guard took out of the split, and why (the router sets it)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Traffic:
        for version in [self.baseline, *self.split, *self.shadow]:
            if not version.isdigit():
                raise ValueError(f"traffic: version '{version}' is not a version number")
        if self.split:
            if any(weight < 0 for weight in self.split.values()):
                raise ValueError("traffic.split: weights must not be negative")
            total = sum(self.split.values())
            if total != 100:
                raise ValueError(f"traffic.split: weights must add up to 100, not {total}")
            if self.baseline not in self.split:
                raise ValueError(f"traffic.split: the baseline '{self.baseline}' must be one of its versions")
        overlap = set(self.shadow) & ({self.baseline} | set(self.split))
        if overlap:
            raise ValueError(f"traffic.shadow: version {sorted(overlap)[0]} also answers (baseline or split)")
        return self

    @property
    def weights(self) -> dict[str, int]:
        """The split in force: every version the split names (the baseline alone when it names none)."""
        return dict(self.split) if self.split else {self.baseline: 100}

    @property
    def versions(self) -> list[str]:
        """Every version the section names: each is loaded and served, whatever the version policy picks."""
        named = {self.baseline, *self.split, *self.shadow}
        return sorted(named, key=int)


class Monitoring(BaseModel):
    """What the router records of a model's predictions (router.prediction_log): a sampled share of them, with the
    joined feature vector, the outputs and keyed hashes of the entity ids; the raw request inputs only on opt-in."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    log_sample_rate: float = Field(0.0, ge=0, le=1, description="Share of the predictions logged (0: none).")
    log_raw_inputs: bool = Field(
        False, description="Log the raw request inputs too (entity ids in clear): only where that is allowed."
    )
    score_output: str = Field(
        "",
        description="The output whose first value per request is the score labels are judged against "
        "(empty: the first output).",
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="Online accuracy: a score at or above it predicts the positive label (1)."
    )


class ModelConfig(BaseModel):
    name: str
    platform: str = "pytorch_torchscript"
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    max_batch_size: int = Field(256, ge=1)
    dynamic_batching: DynamicBatching = Field(default_factory=DynamicBatching)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_spec: FeatureSpec | None = None
    model_input: TensorSpec | None = Field(
        None, description="With a feature_spec: the joined tensor the model service receives."
    )
    traffic: Traffic | None = None
    monitoring: Monitoring | None = None
    version_digests: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_PINNED_VERSIONS,
        description='The SHA-256 each version\'s model.pt must have: {"1": "sha256:<64 hex>"}. Read from the '
        "repository's config.json only: a load's config override cannot change it.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for version, digest in self.version_digests.items():
            if not _VERSION.fullmatch(version):
                raise ValueError(f"model {self.name}: version_digests key '{version[:20]}' is not a version number")
            if not _PINNED_DIGEST.fullmatch(digest):
                raise ValueError(f"model {self.name}: version_digests['{version}'] is not 'sha256:' + 64 hex digits")
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
        traffic = self.traffic
        if traffic is not None:
            if traffic.sticky_input and traffic.sticky_input not in {spec.name for spec in self.inputs}:
                raise ValueError(f"model {self.name}: traffic.sticky_input '{traffic.sticky_input}' is not an input")
            cascade = traffic.cascade
            if cascade is not None:
                if cascade.model == self.name:
                    raise ValueError(f"model {self.name}: traffic.cascade names the model itself")
                if cascade.output and cascade.output not in {spec.name for spec in self.outputs}:
                    raise ValueError(f"model {self.name}: traffic.cascade.output '{cascade.output}' is not an output")
        monitoring = self.monitoring
        outputs = {spec.name for spec in self.outputs}
        if monitoring is not None and monitoring.score_output and monitoring.score_output not in outputs:
            raise ValueError(f"model {self.name}: monitoring.score_output '{monitoring.score_output}' is not an output")
        return self

    @property
    def score_output(self) -> str:
        """The output labels are judged against (monitoring.score_output, else the first output)."""
        if self.monitoring is not None and self.monitoring.score_output:
            return self.monitoring.score_output
        return self.outputs[0].name

    @property
    def threshold(self) -> float:
        return self.monitoring.threshold if self.monitoring is not None else 0.5

    def served_versions(self, available: Sequence[str]) -> list[str]:
        """The versions to serve of the version folders available: those the traffic section names (every one must
        exist: InvalidInput names a missing one), else those the version policy picks."""
        if self.traffic is None:
            return self.version_policy.select(available)
        missing = [version for version in self.traffic.versions if version not in available]
        if missing:
            raise InvalidInput(f"model '{self.name}': traffic names version '{missing[0]}', which it does not have")
        return self.traffic.versions

    @cached_property
    def serving_json(self) -> str:
        """The config less its traffic and monitoring sections and its pins: a change of those alone reloads
        nothing (a changed pin reloads, or refuses, only its version: the model service compares per version)."""
        return self.model_dump_json(exclude={"traffic", "monitoring", "version_digests"})

    def pinned_digest(self, version: str) -> str | None:
        """The SHA-256 (hex) the config pins for a version's weights; None when it pins none."""
        digest = self.version_digests.get(version)
        return digest[len(DIGEST_PREFIX) :] if digest is not None else None

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


READY = "READY"  # Triton's repository index states
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a model as the repository index shows it: its state and, when not READY, why."""

    version: str
    state: str
    reason: str = ""
    profile: str = ""  # the version's baseline profile (infermesh.drift), as JSON; "" when it has none


@dataclass(frozen=True)
class ModelEntry:
    """A model as a hop knows it: its config, the versions it may serve now (READY, ascending) and the state of
    every version it knows of (the repository index)."""

    config: ModelConfig
    versions: list[str]
    statuses: tuple[VersionStatus, ...] = ()

    @property
    def latest(self) -> str:
        """The newest ready version, or "" when none is."""
        return self.versions[-1] if self.versions else ""

    def resolve_version(self, requested: str) -> str:
        """The version a request means: the one named when it is ready, else the baseline of its traffic section or
        the newest ready one. NotFound for a
        version the model does not have; Unavailable for one that is not ready (loading, unloading, failed)."""
        name = self.config.name
        if requested in self.versions or (not requested and self.versions):
            if not requested and self.config.traffic is not None and self.config.traffic.baseline in self.versions:
                return self.config.traffic.baseline  # a model with a traffic section: its baseline by default
            return requested or self.versions[-1]
        if not requested:
            raise Unavailable(f"model '{name}' has no ready version")
        for status in self.statuses:
            if status.version == requested:
                raise Unavailable(f"model '{name}' version '{requested}' is not ready ({status.state})")
        raise NotFound(f"model '{name}' has no version '{requested}'")


def find_model(models: Mapping[str, ModelEntry], name: str) -> ModelEntry:
    """The model of that name, or NotFound."""
    entry = models.get(name)
    if entry is None:
        raise NotFound(f"model '{name}' not found")
    return entry


def read_config(folder: Path) -> ModelConfig:
    """`<folder>/config.json`; ValueError (pydantic's ValidationError is one) or OSError when it is not usable."""
    return parse_config((folder / CONFIG_FILE).read_text())


def parse_config(text: str) -> ModelConfig:
    """A model config from its JSON text (a repository file or a load's override, in the repository's form or in
    Triton's); ValueError when invalid."""
    data = json.loads(text)
    if isinstance(data, dict) and ("input" in data or "output" in data) and "inputs" not in data:
        data = _from_triton(data)
    return ModelConfig.model_validate(data)


# Triton's model_config.proto data types → the protocol's datatypes.
TRITON_DATATYPES = {"TYPE_STRING": "BYTES", **{f"TYPE_{name}": name for name in DATATYPES if name != "BYTES"}}
# Triton's fields that _from_triton converts (the rest pass through: Triton-only ones are ignored).
TRITON_CONVERTED_KEYS = frozenset(
    {"input", "output", "max_batch_size", "dynamic_batching", "version_policy", "parameters"}
)
# The mesh's own sections, carried in Triton's config as `parameters` entries of JSON text.
MESH_SECTIONS = ("feature_spec", "model_input", "traffic", "monitoring")
MESH_PARAMETER_PREFIX = "infermesh."


def mesh_sections(config: ModelConfig) -> dict[str, str]:
    """The mesh's sections of a config, as Triton `parameters` (name → JSON text)."""
    sections: dict[str, str] = {}
    for section in MESH_SECTIONS:
        value = getattr(config, section)
        if value is not None:
            sections[MESH_PARAMETER_PREFIX + section] = value.model_dump_json()
    return sections


def _from_triton(config: dict[str, Any]) -> dict[str, Any]:
    """A model config in Triton's form (model_config.proto as JSON: `input`/`output` with `data_type` and `dims`,
    as `get_model_config(as_json=True)` returns it) in the repository's form. The mesh's own sections
    (`feature_spec`, `model_input`, …) pass through as they are."""
    batched = int(config.get("max_batch_size", 0) or 0) > 0

    def tensors(specs: Any, what: str) -> list[dict[str, Any]]:
        if not isinstance(specs, list):
            raise ValueError(f"{what}: a list of tensors")
        converted = []
        for spec in specs:
            if not isinstance(spec, dict) or "name" not in spec:
                raise ValueError(f"{what}: each tensor needs a name")
            data_type = str(spec.get("data_type", ""))
            datatype = TRITON_DATATYPES.get(data_type)
            if datatype is None:
                raise ValueError(f"{what} '{spec['name']}': data_type {data_type or '(none)'} is not supported")
            dims = [int(d) for d in spec.get("dims", [])]
            tensor = {"name": spec["name"], "datatype": datatype, "shape": [-1, *dims] if batched else dims}
            if spec.get("label_filename"):
                tensor["label_filename"] = spec["label_filename"]
            converted.append(tensor)
        return converted

    converted = {key: value for key, value in config.items() if key not in TRITON_CONVERTED_KEYS}
    parameters = config.get("parameters")
    if not isinstance(parameters, dict):
        parameters = {}
    for section in MESH_SECTIONS:
        parameter = parameters.get(MESH_PARAMETER_PREFIX + section)
        if section not in converted and isinstance(parameter, dict) and "string_value" in parameter:
            try:
                converted[section] = json.loads(parameter["string_value"])
            except json.JSONDecodeError:
                raise ValueError(f"parameters: {MESH_PARAMETER_PREFIX + section} is not JSON") from None
    converted["inputs"] = tensors(config.get("input", []), "input")
    converted["outputs"] = tensors(config.get("output", []), "output")
    if batched:
        converted["max_batch_size"] = int(config["max_batch_size"])
    batching = config.get("dynamic_batching")
    if isinstance(batching, dict):
        converted["dynamic_batching"] = {
            "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0) or 0)
        }
    elif "dynamic_batching" not in config:
        converted["dynamic_batching"] = {"enabled": False}
    policy = config.get("version_policy")
    if isinstance(policy, dict):  # protobuf's JSON writes 64-bit numbers as strings
        if isinstance(policy.get("specific"), dict):
            versions = policy["specific"].get("versions", [])
            converted["version_policy"] = {"specific": {"versions": [int(v) for v in versions]}}
        elif isinstance(policy.get("latest"), dict):
            converted["version_policy"] = {"latest": {"num_versions": int(policy["latest"].get("num_versions", 1))}}
        elif "all" in policy:
            converted["version_policy"] = {"all": {}}
    return converted


def parse_checked(name: str, config_json: str) -> ModelConfig:
    """A load's config override for model `name`: InvalidInput (naming what is wrong) unless valid and for it."""
    try:
        config = parse_config(config_json)
    except ValueError as error:  # invalid JSON or a pydantic ValidationError
        raise InvalidInput(f"model '{name}': invalid config: {first_line(error)}") from None
    if config.name != name:
        raise InvalidInput(f"model '{name}': its config names model '{config.name}'")
    return config


def first_line(error: BaseException) -> str:
    """A short, single-line account of an error (a config's first validation error with where it is)."""
    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}"[:300] if where else str(first["msg"])[:300]
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pin_version(folder: Path, version: str, sha256_hex: str) -> None:
    """Pin `version`'s weights to `sha256_hex` in `<folder>/config.json` (the model's folder): the file's other
    content is kept as written; replaced atomically, so a model service never reads half a file."""
    path = folder / CONFIG_FILE
    document = json.loads(path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a model config is a JSON object")
    pins = document.setdefault("version_digests", {})
    if not isinstance(pins, dict):
        raise ValueError(f"{path}: version_digests is not an object")
    pins[version] = DIGEST_PREFIX + sha256_hex
    document["version_digests"] = dict(sorted(pins.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0))
    partial = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)


def version_folders(folder: Path) -> list[str]:
    """The numeric version folders of a model that hold weights, ascending."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file()]
    return sorted(found, key=int)
