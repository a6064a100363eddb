"""Progressive delivery in the router, transport-free: which version answers a request (a weighted split, sticky
per value of an input when asked), which versions get a mirror of a served batch (shadows, and a sample of a
canary's traffic sent to the baseline to measure divergence), how far two answers diverge, and the guard that
rolls a failing version back. The router's core (router.core) makes the calls; this module decides and counts.

A model's `traffic` section (infermesh.model_config.Traffic) is the contract; the guard's rollbacks are an overlay
on it until the config in force records them (the router loads the config with the version's weight moved to the
baseline and `rolled_back` set, so every router and the repository index agree).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from infermesh import metrics
from infermesh.errors import DeadlineExceeded, DomainError, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from infermesh.model_config import Guard, ModelConfig, Traffic
from infermesh.tensors import Tensor

log = logging.getLogger(__name__)

ARM = "infermesh_arm"  # response parameter: how the answering version was chosen
# Response parameter of a cascaded answer: the model that answered (not the retry layer's trailing metadata
# infermesh.method_handlers.ANSWERED_BY, which names the hop).
ANSWERING_MODEL = "infermesh_answered_by"
BASELINE = "baseline"  # the split sent the request to the baseline
CANARY = "canary"  # the split sent it to another version
REQUESTED = "requested"  # the request named its version
FALLBACK = "fallback"  # the split's version failed; the baseline answered
CASCADE = "cascade"  # the model's answer fell in the cascade band; the larger model answered
SHADOW = "shadow"  # (metrics) a mirror to a shadow version

# Errors that say nothing against the version that raised them: the request's own fault or its time was up.
CLIENT_ERRORS = (InvalidInput, NotFound, Unauthenticated, PermissionDenied, DeadlineExceeded)

# Latency bins of the guard's windows: 0.1 ms to 30 s, 8 per factor of ten (a p99 within ~15 %).
_LATENCY_BOUNDS = np.geomspace(1e-4, 30.0, 45)


def is_version_failure(error: BaseException) -> bool:
    """A failure to count against the version that served (and to answer from the baseline instead)."""
    return isinstance(error, DomainError) and not isinstance(error, CLIENT_ERRORS)


def sticky_point(model: str, value: bytes) -> float:
    """Where on [0, 100) a sticky value lands: the same for the same model and value, whatever the weights."""
    digest = hashlib.blake2b(value, digest_size=8, key=model.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


def sticky_value(tensor: Tensor) -> bytes:
    """A request's sticky key: the first element of its sticky input (a request is one client's, and its rows
    go together)."""
    if tensor.data.size == 0:
        return b""
    first = tensor.data.reshape(-1)[0]
    return first if isinstance(first, bytes) else np.asarray(first).tobytes()


@dataclass(frozen=True)
class Split:
    """The versions that answer and their shares of [0, 100), in ascending version order: moving weight between
    neighbours moves only that share of the sticky values."""

    model: str
    bounds: tuple[float, ...]
    versions: tuple[str, ...]
    baseline: str

    @staticmethod
    def of(model: str, traffic: Traffic, rolled_back: Mapping[str, str]) -> Split:
        weights = traffic.weights
        for version in list(weights):
            if version != traffic.baseline and (version in rolled_back or version in traffic.rolled_back):
                weights[traffic.baseline] += weights[version]
                weights[version] = 0
        bounds: list[float] = []
        versions: list[str] = []
        total = 0.0
        for version in sorted(weights, key=int):
            if weights[version] > 0:
                total += weights[version]
                bounds.append(total)
                versions.append(version)
        return Split(model, tuple(bounds), tuple(versions), traffic.baseline)

    def choose(self, sticky: bytes | None) -> str:
        if len(self.versions) == 1:
            return self.versions[0]
        point = sticky_point(self.model, sticky) if sticky is not None else random.random() * 100.0
        return self.versions[min(bisect.bisect_right(self.bounds, point), len(self.versions) - 1)]

    def weight(self, version: str) -> float:
        if version not in self.versions:
            return 0.0
        index = self.versions.index(version)
        return self.bounds[index] - (self.bounds[index - 1] if index else 0.0)


@dataclass(slots=True)
class _Second:
    second: int
    requests: int = 0
    failures: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(_LATENCY_BOUNDS) + 1, dtype=np.int64))
    divergence_sum: float = 0.0
    divergence_count: int = 0


@dataclass(frozen=True, slots=True)
class Figures:
    requests: int
    failures: int
    p99_s: float | None
    divergence: float | None  # mean |Δ| of compared rows (largest over outputs), None when none was compared

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


class Window:
    """A version's requests, failures, latency and divergence over the last `window_s`, in one-second bins
    (bounded: at most `window_s` + 1 bins), with running totals so that reading the figures costs the same
    whatever the traffic."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._seconds: deque[_Second] = deque()
        self._total = _Second(0)

    def _current(self) -> _Second:
        now = int(self._clock())
        seconds = self._seconds
        if not seconds or seconds[-1].second != now:
            seconds.append(_Second(now))
            total = self._total
            while seconds and seconds[0].second <= now - self.window_s:
                old = seconds.popleft()
                total.requests -= old.requests
                total.failures -= old.failures
                total.latency -= old.latency
                total.divergence_sum -= old.divergence_sum
                total.divergence_count -= old.divergence_count
        return seconds[-1]

    def record(self, latency_s: float, failed: bool) -> None:
        second, total = self._current(), self._total
        second.requests += 1
        total.requests += 1
        if failed:
            second.failures += 1
            total.failures += 1
        else:
            index = bisect.bisect_left(_LATENCY_BOUNDS, latency_s)
            second.latency[index] += 1
            total.latency[index] += 1

    def record_divergence(self, value: float) -> None:
        second, total = self._current(), self._total
        second.divergence_sum += value
        second.divergence_count += 1
        total.divergence_sum += value
        total.divergence_count += 1

    def figures(self) -> Figures:
        self._current()  # drops the bins that left the window
        total = self._total
        compared = total.divergence_count
        divergence = total.divergence_sum / compared if compared else None
        return Figures(total.requests, total.failures, _p99(total.latency), divergence)


def _p99(histogram: np.ndarray) -> float | None:
    total = int(histogram.sum())
    if not total:
        return None
    index = int(np.searchsorted(np.cumsum(histogram), 0.99 * total))
    return float(_LATENCY_BOUNDS[min(index, len(_LATENCY_BOUNDS) - 1)])


@dataclass(frozen=True, slots=True)
class Divergence:
    rows: int
    mean_abs: dict[str, float]  # per output
    flips: dict[str, int]  # per single-score output: rows on different sides of the threshold

    @property
    def largest(self) -> float:
        return max(self.mean_abs.values(), default=0.0)


def divergence(served: Mapping[str, Tensor], other: Mapping[str, Tensor], threshold: float) -> Divergence | None:
    """How far another version's answer is from the served one, per numeric output of the same shape."""
    mean_abs: dict[str, float] = {}
    flips: dict[str, int] = {}
    rows = 0
    for name, tensor in served.items():
        mirrored = other.get(name)
        if mirrored is None or tensor.datatype == "BYTES" or tensor.data.shape != mirrored.data.shape:
            continue
        a = tensor.data.astype(np.float64, copy=False)
        b = mirrored.data.astype(np.float64, copy=False)
        rows = max(rows, a.shape[0] if a.ndim else 1)
        mean_abs[name] = float(np.mean(np.abs(a - b))) if a.size else 0.0
        if a.ndim <= 1 or int(np.prod(a.shape[1:])) == 1:
            flips[name] = int(np.count_nonzero((a.reshape(-1) >= threshold) != (b.reshape(-1) >= threshold)))
    return Divergence(rows, mean_abs, flips) if mean_abs else None


@dataclass
class _ModelTraffic:
    traffic: Traffic
    split: Split
    windows: dict[str, Window]  # per guarded (non-baseline) version of the split, and per shadow


@dataclass(frozen=True, slots=True)
class Mirror:
    """A copy of a served batch to send to another version: a shadow, or the baseline for a canary's guard."""

    version: str  # the version the copy goes to
    watched: str  # the version whose figures the comparison counts for
    arm: str  # SHADOW or CANARY


RollbackHandler = Callable[[str, str, str, Traffic], None]  # model, version, reason, traffic it applied to


class TrafficControl:
    """Every model's traffic section in force, its split (less the versions rolled back), and the windows the
    guard and the shadow figures read."""

    def __init__(self, on_rollback: RollbackHandler, clock: Callable[[], float] = time.monotonic) -> None:
        self._on_rollback = on_rollback
        self._clock = clock
        self._models: dict[str, _ModelTraffic] = {}
        # Rollbacks decided here, until the config in force records them: model → (its traffic then, version → why).
        self._rolled_back: dict[str, tuple[Traffic, dict[str, str]]] = {}

    def _state(self, config: ModelConfig) -> _ModelTraffic | None:
        traffic = config.traffic
        if traffic is None:
            self._models.pop(config.name, None)
            return None
        state = self._models.get(config.name)
        if state is None or state.traffic is not traffic:
            state = self._rebuild(config.name, traffic, state)
        return state

    def _rebuild(self, model: str, traffic: Traffic, previous: _ModelTraffic | None) -> _ModelTraffic:
        overlay = self._rolled_back.get(model)
        if overlay is not None and overlay[0] != traffic:
            del self._rolled_back[model]  # the config changed since: it records the rollback, or a new rollout
            overlay = None
        rolled_back = overlay[1] if overlay is not None else {}
        split = Split.of(model, traffic, rolled_back)
        windows: dict[str, Window] = {}
        guard = traffic.guard
        # The same section again (another copy of the config): the windows go on counting.
        kept = previous.windows if previous is not None and previous.traffic == traffic else {}
        window_s = guard.window_s if guard is not None else 60.0
        for version in [*traffic.split, *traffic.shadow]:
            if version != traffic.baseline:
                windows[version] = kept.get(version) or Window(window_s, self._clock)
        for version in traffic.versions:
            metrics.TRAFFIC_WEIGHT.labels(model, version).set(split.weight(version))
        state = self._models[model] = _ModelTraffic(traffic, split, windows)
        return state

    def choose(self, config: ModelConfig, sticky: Tensor | None) -> tuple[str, str]:
        """(version, arm) for a request that named no version; the model has a traffic section."""
        state = self._state(config)
        assert state is not None
        version = state.split.choose(sticky_value(sticky) if sticky is not None else None)
        return version, BASELINE if version == state.split.baseline else CANARY

    def mirrors(self, config: ModelConfig, version: str) -> list[Mirror]:
        """The copies to send of a batch `version` served (sampled)."""
        state = self._state(config)
        if state is None:
            return []
        traffic = state.traffic
        if version == traffic.baseline:
            if not traffic.shadow or random.random() >= traffic.shadow_sample:
                return []
            return [Mirror(shadow, shadow, SHADOW) for shadow in traffic.shadow]
        guard = traffic.guard
        if guard is not None and version in traffic.split and random.random() < guard.compare_sample:
            return [Mirror(traffic.baseline, version, CANARY)]
        return []

    def record(self, config: ModelConfig, version: str, latency_s: float, failed: bool) -> None:
        """A request a non-baseline version of the split answered (or failed)."""
        state = self._state(config)
        if state is None:
            return
        window = state.windows.get(version)
        if window is None:
            return
        window.record(latency_s, failed)
        self._evaluate(config.name, state, version)

    def compared(
        self,
        config: ModelConfig,
        mirror: Mirror,
        served: Mapping[str, Tensor],
        other: Mapping[str, Tensor],
        latency_s: float,
    ) -> None:
        """A mirror answered: how far the two answers are apart, counted for the watched version."""
        state = self._state(config)
        if state is None:
            return
        found = divergence(served, other, state.traffic.flip_threshold)
        name = config.name
        if mirror.arm == SHADOW:
            metrics.SHADOW_LATENCY.labels(name, mirror.version).observe(latency_s)
        if found is None:
            return
        window = state.windows.get(mirror.watched)
        if window is not None:
            window.record_divergence(found.largest)
        metrics.SHADOW_COMPARED_ROWS.labels(mirror.arm, name, mirror.watched).inc(found.rows)
        for output, value in found.mean_abs.items():
            metrics.SHADOW_DIVERGENCE.labels(mirror.arm, name, output, mirror.watched).set(value)
        for output, count in found.flips.items():
            metrics.SHADOW_FLIPS.labels(mirror.arm, name, output, mirror.watched).inc(count)
        if mirror.arm == CANARY:
            self._evaluate(name, state, mirror.watched)

    def _evaluate(self, model: str, state: _ModelTraffic, version: str) -> None:
        """The guard's verdict on a non-baseline version of the split, after each request or comparison it had
        (its figures are running totals: a constant cost)."""
        guard = state.traffic.guard
        window = state.windows.get(version)
        if guard is None or window is None or version not in state.split.versions:
            return  # no guard, not guarded, or rolled back already
        figures = window.figures()
        metrics.GUARD_ERROR_RATIO.labels(model, version).set(figures.error_ratio)
        if figures.p99_s is not None:
            metrics.GUARD_P99.labels(model, version).set(figures.p99_s)
        if figures.requests < guard.min_requests:
            return
        reason = _breach(guard, figures)
        if reason is not None:
            self._roll_back(model, state, version, *reason)

    def _roll_back(self, model: str, state: _ModelTraffic, version: str, rule: str, reason: str) -> None:
        traffic = state.traffic
        overlay = self._rolled_back.setdefault(model, (traffic, {}))[1]
        overlay[version] = reason
        self._rebuild(model, traffic, state)
        metrics.ROLLBACKS.labels(model, rule, version).inc()
        log.warning("version rolled back", extra={"fields": {"model": model, "version": version, "reason": reason}})
        self._on_rollback(model, version, reason, traffic)


def _breach(guard: Guard, figures: Figures) -> tuple[str, str] | None:
    """(rule, reason) of the first limit the figures break."""
    if guard.max_error_ratio is not None and figures.error_ratio > guard.max_error_ratio:
        return "error_ratio", (
            f"error ratio {figures.error_ratio:.3f} > {guard.max_error_ratio} over {figures.requests} requests"
        )
    if guard.max_p99_ms is not None and figures.p99_s is not None and figures.p99_s * 1000 > guard.max_p99_ms:
        return "p99", f"p99 {figures.p99_s * 1000:.0f} ms > {guard.max_p99_ms:g} ms"
    if (
        guard.max_divergence is not None
        and figures.divergence is not None
        and figures.divergence > guard.max_divergence
    ):
        return "divergence", f"divergence {figures.divergence:.3f} > {guard.max_divergence} from the baseline"
    return None


def rolled_back_config(config: ModelConfig, version: str, reason: str) -> str:
    """A model's config (JSON) with `version`'s weight moved to the baseline and the rollback recorded."""
    traffic = config.traffic
    assert traffic is not None
    split = dict(traffic.split)
    if version in split:
        split[traffic.baseline] += split[version]
        split[version] = 0
    changed = traffic.model_copy(update={"split": split, "rolled_back": {**traffic.rolled_back, version: reason}})
    return config.model_copy(update={"traffic": changed}).model_dump_json()
