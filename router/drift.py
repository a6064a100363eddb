"""Drift of served traffic: per model version, histograms of every input feature and of the prediction over a
sliding window, binned as the version's baseline profile (infermesh.drift) and exported as PSI gauges.

The cost per coalesced batch is a few vectorised numpy calls (bin, count, add); nothing loops over rows. The
window is a ring of `slots` count arrays: a slot that leaves the window is subtracted from the running total, so
the window never rescans what it holds. The PSI gauges are recomputed at most every `export_interval_s` per
version, once the window holds `min_rows` rows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge

from infermesh import metrics
from infermesh.drift import Profile, bin_counts, padded_edges, profile_for, psi, served_columns
from infermesh.model_config import READY, ModelConfig
from infermesh.repository import RepositoryState
from infermesh.tensors import Tensor
from infermesh.windows import SlidingCounts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DriftSettings:
    window_s: float = 900.0
    slots: int = 15
    min_rows: int = 100
    export_interval_s: float = 5.0


class VersionDrift:
    """One model version's window: its profiled features (in the order it receives them) and its prediction."""

    def __init__(
        self,
        model: str,
        version: str,
        profile: Profile,
        feature_positions: list[int],
        feature_names: list[str],
        settings: DriftSettings,
        now: float,
    ) -> None:
        self.model, self.version = model, version
        self.profile = profile
        self.feature_positions = np.asarray(feature_positions, dtype=np.intp)
        self.feature_names = feature_names
        self.settings = settings
        histograms = [profile.features[name] for name in feature_names] + [profile.outputs[profile.prediction]]
        self.edges, self.expected = padded_edges(histograms)
        self.window = SlidingCounts(len(histograms), self.expected.shape[1], settings.window_s, settings.slots, now)
        self._exported_at = -np.inf
        self._feature_gauges = [metrics.FEATURE_DRIFT.labels(name, model, version) for name in feature_names]
        self._prediction_gauge = metrics.PREDICTION_DRIFT.labels(model, version)
        self._rows_gauge = metrics.DRIFT_WINDOW_ROWS.labels(model, version)

    def add(self, features: np.ndarray, prediction: np.ndarray, now: float) -> None:
        """`features` [rows, width] as the version received them, `prediction` [rows]."""
        columns = features[:, self.feature_positions] if len(self.feature_positions) else features[:, :0]
        values = np.concatenate([columns, prediction.reshape(-1, 1)], axis=1)
        self.window.add(bin_counts(self.edges, values), now)
        if now - self._exported_at >= self.settings.export_interval_s:
            self.export(now)

    def export(self, now: float) -> None:
        self._exported_at = now
        self.window.advance(now)
        rows = self.window.rows
        self._rows_gauge.set(rows)
        if rows < self.settings.min_rows:
            return
        scores = psi(self.expected, self.window.total)
        for gauge, score in zip(self._feature_gauges, scores[:-1], strict=True):
            gauge.set(float(score))
        self._prediction_gauge.set(float(scores[-1]))

    def forget(self) -> None:
        """Remove this version's series (it no longer serves, or its profile changed)."""
        for name in self.feature_names:
            _remove(metrics.FEATURE_DRIFT, name, self.model, self.version)
        _remove(metrics.PREDICTION_DRIFT, self.model, self.version)
        _remove(metrics.DRIFT_WINDOW_ROWS, self.model, self.version)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never exported
        metric.remove(*labels)


class DriftMonitors:
    """Every served model version's drift window, built from the profile its replicas reported (a version without
    a profile has none). Bounded by the versions the replicas serve: a version that leaves is forgotten."""

    def __init__(
        self,
        settings: DriftSettings,
        repository: Callable[[], RepositoryState],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._repository = repository
        self._clock = clock
        self._state: RepositoryState | None = None
        # (model, version) → (its profile's text, its window or None: no usable profile)
        self._monitors: dict[tuple[str, str], tuple[str, VersionDrift | None]] = {}

    def observe(
        self,
        config: ModelConfig,
        version: str,
        outputs: Mapping[str, Tensor],
        features: np.ndarray | None = None,
        inputs: Mapping[str, Tensor] | None = None,
    ) -> None:
        """A batch `version` served: `features` the joined vector of a feature_spec model, else its `inputs`."""
        monitor = self._monitor(config, version)
        if monitor is None:
            return
        prediction = outputs.get(monitor.profile.prediction)
        if prediction is None:
            return
        rows = prediction.shape[0]
        try:
            if features is None:
                features = _input_columns(inputs or {}, monitor.feature_names, rows)
            values = np.asarray(prediction.data, dtype=np.float64).reshape(rows, -1)[:, 0]
            monitor.add(features, values, self._clock())
        except (ValueError, IndexError, TypeError) as error:  # a served batch must never fail for its statistics
            log.error("drift window disabled", extra={"fields": {"model": config.name, "error": type(error).__name__}})
            monitor.forget()
            self._monitors[(config.name, version)] = (self._monitors[(config.name, version)][0], None)

    def _monitor(self, config: ModelConfig, version: str) -> VersionDrift | None:
        state = self._repository()
        if state is not self._state:
            self._sync(state)
        known = self._monitors.get((config.name, version))
        if known is not None:
            return known[1]
        profile_json = _profile_of(state, config.name, version)
        monitor = _build(config, version, profile_json, self.settings, self._clock()) if profile_json else None
        self._monitors[(config.name, version)] = (profile_json, monitor)
        return monitor

    def _sync(self, state: RepositoryState) -> None:
        """Forget the versions that left or whose profile changed."""
        self._state = state
        for key, (profile_json, monitor) in list(self._monitors.items()):
            if _profile_of(state, *key) != profile_json or not _ready(state, *key):
                del self._monitors[key]
                if monitor is not None:
                    monitor.forget()

    def export(self) -> None:
        """Recompute every window's gauges now (tests and shutdown; the request path does it periodically)."""
        state = self._repository()
        if state is not self._state:
            self._sync(state)
        now = self._clock()
        for _, monitor in self._monitors.values():
            if monitor is not None:
                monitor.export(now)


def _profile_of(state: RepositoryState, model: str, version: str) -> str:
    held = state.models.get(model)
    if held is None:
        return ""
    for status in held.versions:
        if status.version == version:
            return status.profile
    return ""


def _ready(state: RepositoryState, model: str, version: str) -> bool:
    held = state.models.get(model)
    return held is not None and any(s.version == version and s.state == READY for s in held.versions)


def _build(
    config: ModelConfig, version: str, profile_json: str, settings: DriftSettings, now: float
) -> VersionDrift | None:
    """The version's window, or None when its profile does not fit the model (logged once)."""
    try:
        profile = profile_for(config, profile_json)
    except ValueError as error:
        log.error("profile unusable", extra={"fields": {"model": config.name, "version": version, "error": str(error)}})
        return None
    columns = served_columns(config)
    names = list(profile.features)
    positions = [columns.index(name) for name in names] if config.feature_spec is not None else list(range(len(names)))
    return VersionDrift(config.name, version, profile, positions, names, settings, now)


def _input_columns(inputs: Mapping[str, Tensor], names: list[str], rows: int) -> np.ndarray:
    """A model without a feature_spec: its profiled inputs, one scalar per row each, as [rows, len(names)]."""
    columns = np.empty((rows, len(names)), dtype=np.float64)
    for position, name in enumerate(names):
        tensor = inputs.get(name)
        data = np.asarray(tensor.data).reshape(rows, -1)[:, 0] if tensor is not None else np.nan
        columns[:, position] = data
    return columns
