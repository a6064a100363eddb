"""Gateway settings (env prefix GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from infermesh.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    port: int = Field(8001, description="gRPC port clients call (Triton's default gRPC port).")
    http_port: int = Field(
        -1,
        ge=-1,
        description="HTTP/REST port of the same API (KServe v2 REST, Triton's HTTP API; Triton's default is 8000), "
        "bound on `host` with the gRPC port's TLS; 0 picks a free one; -1: gRPC only.",
    )
    # Parsing JSON holds the event loop ~10 ms per MiB here (every other request waits): larger tensors travel as
    # binary data after the JSON part (Triton's binary tensor extension, tritonclient.http's default) or over gRPC.
    http_max_json_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest JSON part of an HTTP/REST request (larger: 413)."
    )
    http_max_connections: int = Field(
        1024, ge=1, description="HTTP/REST connections open at once; more are closed as soon as they are made."
    )
    http_first_request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="An HTTP/REST connection that sends no whole request head in this time (at most "
        "twice it) is closed; idle keep-alive connections are closed after 75 s.",
    )
    router_address: str = Field(
        "127.0.0.1:8011", description="Router target; a dns:/// name balances over several routers."
    )
    api_keys_path: Path = Field(
        Path("api_keys.json"),
        description="JSON file of SHA-256 API key hashes (each with tenant, models and role) and per-tenant "
        "quotas; re-read when it changes.",
    )
    jwks_path: Path | None = Field(
        None, description="JWKS file of the keys that sign accepted JWTs (RS256/ES256); unset: API keys only."
    )
    jwt_issuer: str = Field("", description="The `iss` a JWT must carry (required with jwks_path).")
    jwt_audience: str = Field("", description="The `aud` a JWT must name (required with jwks_path).")
    jwt_leeway_s: float = Field(30.0, ge=0, description="Clock skew allowed on a JWT's exp and nbf.")
    access_log_rate: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Share of requests that get an access log line (tenant, model, version, status, latency, "
        "flags, trace id; never inputs or credentials); 0 turns it off.",
    )
    credentials_reload_s: float = Field(
        1.0, gt=0, description="How often the key and JWKS files are checked for changes (a stat each)."
    )
    max_inflight: int = Field(
        256, ge=1, description="The most requests admitted at once (the adaptive limit stays under it)."
    )
    admission_min_inflight: int = Field(
        32,
        ge=1,
        description="The adaptive limit's floor: below it requests are too few to share batches, and goodput falls.",
    )
    admission_target_ms: float = Field(
        0.0,
        ge=0,
        description="Adaptive admission: the in-flight limit shrinks while the 90th percentile of admitted requests' "
        "time in the gateway exceeds this, and grows back while it does not. 0 (the default): off, max_inflight "
        "alone — on the 2-core bench machine the gateway's p90 at full throughput is above any useful target, so "
        "a target costs throughput there (BENCHMARKS.md, overload); set it where the gateway has cores to spare.",
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, description="Largest request accepted.")
    tls_client_auth: bool = Field(
        False,
        description="With TLS on, require every client to present a certificate signed by tls_ca_file "
        "(off: the public port takes any TLS client; callers authenticate with API keys or JWTs).",
    )
    router_attempts: int = Field(2, ge=1, description="Attempts per router call when the router is unavailable.")
    router_unreachable_wait_s: float = Field(
        5.0,
        ge=0,
        description="When no router is reachable (one restarting), how long a request waits for a connection, "
        "within its deadline, before it fails UNAVAILABLE; 0: at once.",
    )
    repository_refresh_s: float = Field(
        1.0, gt=0, description="How often the mesh's models (configs and version states) are read from the router."
    )
    coalesce: bool = Field(
        True, description="Merge concurrent requests for one model into one router call (each keeps its answer)."
    )
    # 1 measured best on two cores (docs/performance.md): fewer, larger router calls leave more CPU for the
    # rest of the mesh. Raise it when the gateway talks to several routers.
    coalesce_max_inflight_batches: int = Field(
        1, ge=1, description="Router calls in flight per model before arriving requests wait to share the next."
    )

    feedback_redis_url: str = Field(
        "",
        description="Redis of the router's prediction log (redis:// or rediss://), where label feedback joins labels "
        "to logged predictions; empty: the Feedback service answers FAILED_PRECONDITION.",
    )
    feedback_redis_password_file: Path | None = Field(
        None, description="File holding that Redis's password (read at start, never logged)."
    )
    feedback_stream: str = Field(
        "infermesh:predictions", description="The prediction log's stream key (the router's prediction_log_stream)."
    )
    feedback_max_labels: int = Field(1000, ge=1, description="Most labels one ReportLabels call may carry.")
    online_window_s: float = Field(
        3600.0, gt=0, description="Online accuracy: the sliding window of labels (by when they were reported)."
    )
    online_slots: int = Field(12, ge=1, le=600, description="Online accuracy: slots of the window.")
    online_min_labels: int = Field(
        20, ge=1, description="Online accuracy: labels a version's window must hold before its gauges are set."
    )

    @model_validator(mode="after")
    def _bound_grpc_backlog(self) -> GatewaySettings:
        # Calls gRPC queues before Python sees them are bounded too: max_inflight plus room for health
        # checks and metadata calls. Without it, overload built a multi-second backlog inside gRPC.
        if self.max_concurrent_rpcs is None:
            self.max_concurrent_rpcs = self.max_inflight + 32
        # And calls gRPC core holds while the event loop is too busy to pick them up: at 3x capacity the
        # default 1000 made accepted requests wait 5 s. 64 refused legitimate bursts at c=128 (random
        # early drop starts at the soft limit); max_inflight keeps the closed-loop backlog under it.
        if self.max_pending_rpcs is None:
            self.max_pending_rpcs = self.max_inflight
        return self
