"""What the mesh knows of its model repository, transport-free: each model's config in force and the state of its
versions. The model services own it (each of its own loaded state); the router merges its replicas' states and the
gateway reads the router's (`infermesh.repository_service` carries it between hops).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from infermesh.dataplane import ModelIndexEntry
from infermesh.errors import InvalidInput
from infermesh.model_config import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    ModelConfig,
    ModelEntry,
    Traffic,
    VersionStatus,
    parse_config,
)

# When replicas disagree, the state the mesh shows for a version: READY on one replica is READY.
_STATE_RANK = {READY: 0, LOADING: 1, UNLOADING: 2, UNAVAILABLE: 3}


@dataclass(frozen=True)
class ModelState:
    """One model: its config in force (as JSON too, as the repository or a load's override gave it) and every
    version the holder knows of, ascending."""

    config: ModelConfig
    config_json: str
    versions: tuple[VersionStatus, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def ready_versions(self) -> list[str]:
        return [status.version for status in self.versions if status.state == READY]

    def entry(self) -> ModelEntry:
        return ModelEntry(self.config, self.ready_versions(), self.versions)

    @staticmethod
    def of(config_json: str, versions: Iterable[VersionStatus]) -> ModelState:
        ordered = tuple(sorted(versions, key=lambda status: _version_key(status.version)))
        return ModelState(parse_config(config_json), config_json, ordered)


@dataclass(frozen=True)
class RepositoryState:
    """Every model a hop knows, under a generation that changes whenever anything in it does."""

    generation: str
    models: Mapping[str, ModelState] = field(default_factory=dict)

    def unavailable(self, reason: str) -> RepositoryState:
        """The same models with no version READY (their holder cannot serve now)."""
        models = {
            name: ModelState(
                model.config,
                model.config_json,
                tuple(VersionStatus(s.version, UNAVAILABLE, reason) if s.state == READY else s for s in model.versions),
            )
            for name, model in self.models.items()
        }
        return RepositoryState(self.generation + "-down", models)

    def entries(self) -> dict[str, ModelEntry]:
        return {name: state.entry() for name, state in self.models.items()}

    def index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        """Triton's repository index: a row per model version (a model without versions: one row, no version)."""
        rows: list[ModelIndexEntry] = []
        for name in sorted(self.models):
            state = self.models[name]
            if not state.versions and not ready_only:
                rows.append(ModelIndexEntry(name, "", UNAVAILABLE, "no version to serve"))
            traffic = state.config.traffic
            for status in state.versions:
                if status.state == READY or not ready_only:
                    reason = status.reason
                    if not reason and status.state == READY and traffic is not None:
                        reason = traffic_role(traffic, status.version)
                    rows.append(ModelIndexEntry(name, status.version, status.state, reason))
        return rows


def traffic_role(traffic: Traffic, version: str) -> str:
    """What a READY version does under the model's traffic section, as the repository index's reason shows it:
    "baseline 90 %", "canary 10 %", "shadow", "rolled back: <why>", or "" (a version the section does not name)."""
    if version in traffic.rolled_back:
        return f"rolled back: {traffic.rolled_back[version]}"
    weights = traffic.weights
    if version in weights:
        role = "baseline" if version == traffic.baseline else "canary"
        return f"{role} {weights[version]} %"
    return "shadow" if version in traffic.shadow else ""


def merge(states: Iterable[RepositoryState]) -> RepositoryState:
    """The mesh-wide view of several replicas: a version is READY where any replica has it READY (else the most
    hopeful state any replica reports); a model's config is taken from a replica where it is ready, when one is."""
    merged: dict[str, tuple[ModelState, dict[str, VersionStatus]]] = {}
    generations: list[str] = []
    for state in states:
        generations.append(state.generation)
        for name, model in state.models.items():
            known = merged.get(name)
            if known is None or (not known[0].ready_versions() and model.ready_versions()):
                merged[name] = (model, known[1] if known is not None else {})
            statuses = merged[name][1]
            for status in model.versions:
                current = statuses.get(status.version)
                if current is None or _STATE_RANK[status.state] < _STATE_RANK[current.state]:
                    statuses[status.version] = status
    models = {
        name: ModelState(
            model.config, model.config_json, tuple(sorted(statuses.values(), key=lambda s: _version_key(s.version)))
        )
        for name, (model, statuses) in merged.items()
    }
    return RepositoryState(generation_of(generations), models)


def generation_of(parts: Iterable[str]) -> str:
    """A short token that changes when any of the parts does."""
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


CONFIG_PARAMETER = "config"  # a load's full model config (JSON) to apply instead of the repository's
# A repository call without a deadline of its own gets this long: loading and warming a model takes far longer than
# an inference, and a load cut short by the default inference timeout would be reported failed while it goes on.
REPOSITORY_TIMEOUT_S = 300.0


def load_config_of(parameters: Mapping[str, object]) -> str | None:
    """The `config` override among a load's parameters (gRPC's or HTTP's, as values), if any. Triton's file
    overrides (`file:…`) are not taken: model files come from the repository (see `infermesh models publish`)."""
    for key in parameters:
        if key.startswith("file:"):
            raise InvalidInput(f"load parameter '{key[:64]}': model files are not taken over the API; publish them")
    value = parameters.get(CONFIG_PARAMETER)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidInput("load parameter 'config' is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InvalidInput("load parameter 'config' must be a string holding the model config as JSON")
