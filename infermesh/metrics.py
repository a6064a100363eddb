"""Prometheus metrics every service exposes. Names are a contract with deploy/prometheus and deploy/grafana."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Fine buckets at the low end: the mesh's hops are sub-millisecond.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

BUILD_INFO = Info("infermesh_build", "Service name and version.", ["service"])

REQUESTS = Counter(
    "infermesh_requests",
    "gRPC requests served, by method, model, version and status code.",
    ["service", "method", "model", "version", "code"],
)
REQUEST_LATENCY = Histogram(
    "infermesh_request_duration_seconds",
    "Server-side latency of gRPC requests.",
    ["service", "method", "model"],
    buckets=LATENCY_BUCKETS,
)
INFLIGHT = Gauge("infermesh_inflight_requests", "Requests being served now.", ["service"])
ADMISSION_REJECTED = Counter(
    "infermesh_admission_rejected",
    "Requests refused at once because a bound was reached.",
    ["service", "reason"],
)
ADMISSION_LIMIT = Gauge(
    "infermesh_admission_limit", "Requests a service works on at once now (its adaptive limit).", ["service"]
)
QUEUE_DEPTH = Gauge(
    "infermesh_queue_depth",
    "Requests waiting in a batching queue, per queue: model version and, at the gateway, coalescing group.",
    ["service", "model", "version", "group"],
)
MODEL_LOADED = Gauge(
    "infermesh_model_loaded", "Model versions a model service replica has loaded and serves (1).", ["model", "version"]
)
BATCH_SIZE = Histogram(
    "infermesh_batch_size", "Rows per batch sent to a model.", ["service", "model"], buckets=BATCH_BUCKETS
)
QUEUE_WAIT = Histogram(
    "infermesh_queue_wait_seconds", "Time a request waited for its batch.", ["service", "model"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
FORWARD_LATENCY = Histogram(
    "infermesh_forward_seconds", "Model forward pass per batch.", ["model", "version", "device"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
FEATURE_FETCH_LATENCY = Histogram(
    "infermesh_feature_fetch_seconds", "Router's feature fetch per coalesced batch.", ["model"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
FEATURE_LOOKUPS = Counter("infermesh_feature_lookups", "Entity rows looked up.", ["view"])
FEATURE_MISSES = Counter("infermesh_feature_misses", "Entity rows not found.", ["view"])
FEATURE_STALE = Counter("infermesh_feature_stale", "Entity rows older than the view's max_age.", ["view"])
FEATURE_DEFAULTED = Counter(
    "infermesh_feature_defaults_used", "Rows served with default features (policy 'default').", ["model"]
)
CIRCUIT_OPEN = Gauge(
    "infermesh_circuit_open", "1 while the circuit breaker to a dependency is open or probing.", ["dependency"]
)
SHORT_CIRCUITED = Counter(
    "infermesh_short_circuited", "Calls not made because the dependency's circuit breaker was open.", ["dependency"]
)
HEDGES = Counter("infermesh_hedges", "Second copies sent of a call that was slow to answer.", ["target"])
HEDGES_WON = Counter("infermesh_hedges_won", "Hedged calls the second copy answered first.", ["target"])
RETRIES_THROTTLED = Counter(
    "infermesh_retries_throttled",
    "Retries not made because the downstream's retry budget was spent (it keeps failing).",
    ["target"],
)
RETRIES = Counter("infermesh_retries", "Downstream calls retried, by target and status code.", ["target", "code"])
EJECTIONS = Counter("infermesh_ejections", "Model replicas ejected as outliers, by rule.", ["rule"])


class ArrayHistogram(Collector):
    """A histogram with one label fed whole arrays at a time: one np.searchsorted per call instead of one
    `observe` (a lock and a bucket walk) per value, for the feature service's per-entity ages (up to 10,000 a
    read). Label values must be bounded by the caller (here: the registered feature views)."""

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = np.array(buckets, dtype=np.float64)
        self._children: dict[str, tuple[np.ndarray, list[float]]] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def observe_many(self, label_value: str, values: np.ndarray) -> None:
        if not values.size:
            return
        # Prometheus buckets are `value <= le`: side="left" puts a value equal to a bound in that bound's bucket.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds) + 1)
        total = float(values.sum())
        with self._lock:
            child = self._children.get(label_value)
            if child is None:
                child = self._children[label_value] = (np.zeros(len(self.bounds) + 1, dtype=np.int64), [0.0])
            child[0][:] += counts
            child[1][0] += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(value, counts.cumsum(), sums[0]) for value, (counts, sums) in self._children.items()]
        bounds = [*(f"{bound:g}" for bound in self.bounds), "+Inf"]
        for value, cumulative, total in snapshot:
            family.add_metric(
                [value], list(zip(bounds, (float(count) for count in cumulative), strict=True)), sum_value=total
            )
        yield family


# Feature age at read (M5, feature freshness): seconds since the event of each vector served.
FEATURE_AGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0, 86400.0)
FEATURE_AGE = ArrayHistogram(
    "infermesh_feature_age_seconds",
    "Age of each entity's feature vector when it is read (now - its event time), per view.",
    "view",
    FEATURE_AGE_BUCKETS,
)
FEATURE_VIEW_MAX_AGE = Gauge(
    "infermesh_feature_view_max_age_seconds", "The view's max_age: values older are stale (0: never).", ["view"]
)
REPLICAS_UP = Gauge("infermesh_replicas_up", "Model service replicas the router considers healthy.")

# Progressive delivery (router.traffic): arms, mirrors, the guard.
TRAFFIC_REQUESTS = Counter(
    "infermesh_traffic_requests", "Requests of models with a traffic section, by answering version and arm.",
    ["arm", "model", "version"],
)  # fmt: skip
TRAFFIC_WEIGHT = Gauge(
    "infermesh_traffic_weight", "Share of a model's traffic (percent) each version gets now.", ["model", "version"]
)
SHADOW_DIVERGENCE = Gauge(
    "infermesh_shadow_divergence",
    "Mean |difference| per output between a version's answer and the served (or baseline) answer, last batch "
    "compared. arm: shadow (mirror to a shadow version) or canary (a canary's request sent to the baseline too).",
    ["arm", "model", "output", "version"],
)
SHADOW_FLIPS = Counter(
    "infermesh_shadow_flips", "Compared rows whose score lies on the other side of the flip threshold.",
    ["arm", "model", "output", "version"],
)  # fmt: skip
SHADOW_COMPARED_ROWS = Counter(
    "infermesh_shadow_compared_rows", "Rows whose answers were compared.", ["arm", "model", "version"]
)
SHADOW_LATENCY = Histogram(
    "infermesh_shadow_latency_seconds", "Mirrored calls to shadow versions.", ["model", "version"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
MIRRORS_DROPPED = Counter(
    "infermesh_mirrors_dropped", "Mirrored calls not sent: too many in flight, or they failed.", ["model", "reason"]
)
GUARD_ERROR_RATIO = Gauge(
    "infermesh_guard_error_ratio", "A guarded version's error ratio over the guard's window.", ["model", "version"]
)
GUARD_P99 = Gauge(
    "infermesh_guard_p99_seconds", "A guarded version's p99 over the guard's window.", ["model", "version"]
)
ROLLBACKS = Counter(
    "infermesh_rollbacks", "Versions the guard took out of the split, by the rule broken.", ["model", "rule", "version"]
)
CASCADES = Counter(
    "infermesh_cascades", "Requests of a cascading model, by outcome: small, large, skipped (no time or failed).",
    ["model", "outcome"],
)  # fmt: skip


# Model quality (router.drift, router.prediction_log): drift of served traffic against each version's profile.
FEATURE_DRIFT = Gauge(
    "infermesh_feature_drift_psi",
    "PSI of an input feature's served values over the drift window against the version's training profile "
    "(0.1 drifting, 0.25 shifted).",
    ["feature", "model", "version"],
)
PREDICTION_DRIFT = Gauge(
    "infermesh_prediction_drift_psi",
    "PSI of the version's predictions over the drift window against their distribution on the training data.",
    ["model", "version"],
)
DRIFT_WINDOW_ROWS = Gauge(
    "infermesh_drift_window_rows", "Rows a version's drift window holds now (PSI is exported from min_rows).",
    ["model", "version"],
)  # fmt: skip
PREDICTION_LOG_RECORDS = Counter(
    "infermesh_prediction_log_records", "Predictions sampled into the prediction log's buffer.", ["model"]
)
PREDICTION_LOG_WRITTEN = Counter("infermesh_prediction_log_written", "Prediction records written to the stream.")
PREDICTION_LOG_DROPPED = Counter(
    "infermesh_prediction_log_dropped",
    "Prediction records dropped: buffer full (never waited for) or the stream could not be written.",
    ["reason"],
)
# Cold starts (M8), at the model service: it knows when a version became READY and when it first answered.
VERSION_READY_TIME = Gauge(
    "infermesh_version_ready_timestamp_seconds", "When this replica's model version became READY (Unix time).",
    ["model", "version", "replica"],
)  # fmt: skip
FIRST_REQUEST_LATENCY = Gauge(
    "infermesh_cold_start_first_request_seconds",
    "Latency of the first request a model version served on this replica after it became READY (queue and forward).",
    ["model", "version", "replica"],
)
COLD_REQUESTS = Counter(
    "infermesh_cold_requests",
    "Requests a model version served within cold_window_s of becoming READY on this replica (their share of the "
    "model service's infermesh_requests_total is the cold-start rate).",
    ["model", "version", "replica"],
)
# Label feedback and online accuracy (M4), at the gateway that receives the labels (gateway.online_accuracy).
FEEDBACK_LABELS = Counter(
    "infermesh_feedback_labels",
    "Labels reported, by result: joined, not_found, labelled_before, invalid, denied (another tenant's request).",
    ["result"],
)
ONLINE_ACCURACY = Gauge(
    "infermesh_online_accuracy",
    "Share of the labelled predictions over the online window that were right at the model's threshold.",
    ["model", "version"],
)
ONLINE_BRIER = Gauge(
    "infermesh_online_brier_score", "Mean squared error of the labelled scores over the online window (0 best).",
    ["model", "version"],
)  # fmt: skip
ONLINE_AUC = Gauge(
    "infermesh_online_auc", "Area under the ROC curve of the labelled scores over the online window.",
    ["model", "version"],
)  # fmt: skip
ONLINE_LABELS = Gauge(
    "infermesh_online_labels", "Labels the online window holds now (the gauges above are set from min_labels).",
    ["model", "version"],
)  # fmt: skip
LABEL_DELAY = Histogram(
    "infermesh_label_delay_seconds",
    "Time from a prediction to its label's event time (how late the truth arrives).",
    ["model", "version"],
    buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400),
)


@dataclass(slots=True)
class RequestLabels:
    """Metric labels of the call being served, filled in by a core once it has resolved a known model (bounded
    cardinality); the method handler wrapper reads them when it counts the call."""

    model: str = ""
    version: str = ""


request_labels: ContextVar[RequestLabels | None] = ContextVar("infermesh_request_labels", default=None)


def label_request(model: str, version: str = "") -> None:
    labels = request_labels.get()
    if labels is not None:
        labels.model = model
        labels.version = version


class RequestCounters:
    """One service's requests, counted by method, model, version and code and timed, with its in-flight gauge:
    what every edge of a service records per request (the gRPC handler wrapper, the gateway's HTTP front)."""

    MAX_CHILDREN = 10_000  # label sets cached (models and versions are validated before labelling)

    def __init__(self, service: str) -> None:
        self._service = service
        self.inflight = INFLIGHT.labels(service)
        # (method, model, version, code) → its request counter and latency histogram: `labels()` per request
        # takes a lock and builds the label tuple every time.
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    def record(self, method: str, model: str, version: str, code: str, seconds: float) -> None:
        key = (method, model, version, code)
        children = self._children.get(key)
        if children is None:
            children = (
                REQUESTS.labels(self._service, method, model, version, code),
                REQUEST_LATENCY.labels(self._service, method, model),
            )
            if len(self._children) < self.MAX_CHILDREN:
                self._children[key] = children
        requests, latency = children
        requests.inc()
        latency.observe(seconds)
