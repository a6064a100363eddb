"""Router settings (env prefix ROUTER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from infermesh.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore")

    port: int = Field(8011, description="gRPC port; 0 picks a free one (written to port_file).")
    feature_service_address: str = Field("127.0.0.1:8021", description="host:port of the feature service.")
    model_replicas: str = Field("", description="Comma-separated host:port of model service replicas.")
    model_service_dns: str = Field(
        "",
        description="host:port of a headless Service; re-resolved every discovery_interval_s (Kubernetes). "
        "Used instead of model_replicas when set.",
    )
    discovery_interval_s: float = Field(5.0, description="How often model_service_dns is re-resolved.")
    health_interval_s: float = Field(1.0, description="How often each replica's gRPC health is checked.")
    repository_refresh_s: float = Field(
        0.5,
        gt=0,
        description="How often each replica's model states are read (keep it well under the model services' "
        "unload_grace_s).",
    )
    feature_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed or timed-out feature reads that open the feature store's breaker."
    )
    feature_breaker_open_s: float = Field(
        0.25,
        gt=0,
        description="How long the breaker stays open before one read probes the feature store again (a probe is "
        "one request's read, so probing often costs little and bounds how long a recovered store goes unused).",
    )
    hedge_max_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Hedged model calls: a call slower than the recent p95 gets a copy on another replica, at most "
        "this share of the calls (0: off).",
    )
    eject_s: float = Field(2.0, description="How long an ejected replica (an outlier) is avoided.")
    eject_consecutive_failures: int = Field(
        1, ge=1, description="Failed calls in a row that eject a replica (a dead one fails every call at once)."
    )
    eject_min_success_rate: float = Field(
        0.5, ge=0, le=1, description="A replica whose recent calls succeeded less often than this is ejected."
    )
    eject_min_calls: int = Field(20, ge=1, description="Recent calls a replica must have had to be judged by rate.")
    max_ejected_share: float = Field(
        0.5, ge=0, le=1, description="The most replicas ejected at once, as a share (at least one may always be)."
    )
    max_attempts: int = Field(3, ge=1, description="Attempts per downstream call (first try included).")
    backoff_initial_ms: float = Field(2.0, description="First retry backoff (exponential, full jitter).")
    backoff_max_ms: float = Field(50.0, description="Largest retry backoff.")
    max_batch_rows: int = Field(1024, ge=1, description="Most rows coalesced into one feature read + model call.")
    max_inflight_batches: int = Field(4, ge=1, description="Coalesced batches in flight per model at once.")
    max_pending_requests: int = Field(
        4096, ge=1, description="Requests waiting to be coalesced per model; beyond it RESOURCE_EXHAUSTED."
    )
    max_mirrors: int = Field(
        64,
        ge=0,
        description="Mirrored calls (shadow versions, a guarded canary's comparison with the baseline) in flight at "
        "once; past it a mirror is dropped and counted (infermesh_mirrors_dropped_total), never waited for.",
    )
    mirror_timeout_ms: float = Field(1000.0, gt=0, description="Deadline of one mirrored call.")
    mirror_linger_ms: float = Field(
        100.0,
        ge=0,
        description="How long a mirror target waits for more served batches before each call (fewer, larger "
        "mirrored calls; the comparison is a moment later, never the answer).",
    )
    drift_window_s: float = Field(
        900.0, gt=0, description="Drift: the sliding window of served traffic compared with each version's profile."
    )
    drift_slots: int = Field(15, ge=1, le=600, description="Drift: slots of the window (it slides a slot at a time).")
    drift_min_rows: int = Field(
        100, ge=1, description="Drift: rows a version's window must hold before its PSI is exported."
    )
    drift_export_interval_s: float = Field(
        5.0, ge=0, description="Drift: how often a served version's PSI gauges are recomputed (at most)."
    )
    prediction_log_redis_url: str = Field(
        "",
        description="Redis of the prediction log's stream (redis:// or rediss://); empty: no prediction log. Models "
        "opt in with monitoring.log_sample_rate.",
    )
    prediction_log_redis_password_file: Path | None = Field(
        None, description="File holding that Redis's password (read at start, never logged)."
    )
    prediction_log_hash_key_file: Path | None = Field(
        None,
        description="File holding the key entity ids are hashed with (HMAC-SHA256); required with the log. Keep it "
        "secret and stable: records of one entity share its hash only under one key.",
    )
    prediction_log_stream: str = Field("infermesh:predictions", description="The prediction log's stream key.")
    prediction_log_max_len: int = Field(
        100_000, ge=1, description="Entries the stream keeps (XADD MAXLEN ~: trimmed in whole nodes, about this)."
    )
    prediction_log_index_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="How long a logged prediction can be found by its request id for label feedback (a small hash "
        "per record with this TTL; 0: no index, no feedback). Holds about TTL x logged records/s entries.",
    )
    prediction_log_buffer: int = Field(
        10_000, ge=1, description="Records waiting to be written; past it a record is dropped and counted."
    )
