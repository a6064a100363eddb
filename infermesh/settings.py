"""Typed settings shared by every service; each service subclasses with its own env prefix."""

from __future__ import annotations

import resource
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infermesh.tls import ClientTls, ServerTls


def default_max_connections() -> int:
    """4,096 connections, or a quarter of the process's file descriptor limit when that is lower: a flood of
    connections is refused at the cap instead of using up the descriptors the process needs for everything else
    (its own connections onward, its other ports)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 4))


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses set `model_config = SettingsConfigDict(env_prefix=...)`."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds; 0.0.0.0 to listen on all.")
    port: int = Field(0, description="gRPC port; 0 picks a free port (written to port_file).")
    health_port: int = Field(
        0,
        description="Port of a second gRPC server that serves only grpc.health.v1 (probes never compete with "
        "the API for capacity); 0 picks a free one (written to port_file); -1 disables it. The API port "
        "answers health checks too.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus /metrics HTTP server.")
    metrics_port: int = Field(0, description="Prometheus port; 0 picks a free one; -1 disables it.")
    port_file: Path | None = Field(
        None, description="If set, the bound ports are written here as JSON once the server is ready."
    )
    default_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of a call whose client set none (a client's own deadline is honoured)."
    )
    grace_period_s: float = Field(10.0, description="On SIGTERM, how long in-flight requests may drain.")
    log_level: str = Field("INFO", description="Python log level of the JSON logs.")
    max_message_bytes: int = Field(64 * 1024 * 1024, description="Largest gRPC message accepted or sent.")
    max_pending_rpcs: int | None = Field(
        None,
        ge=1,
        description="Calls gRPC core may hold for Python to pick up (soft limit; twice that is the hard "
        "limit). Past it core refuses calls (CANCELLED) without running any Python: the only shedding that "
        "still works when the event loop itself is saturated. None: gRPC's default (1000 / 3000).",
    )
    max_concurrent_rpcs: int | None = Field(
        None,
        ge=1,
        description="RPCs gRPC itself admits at once (health checks included); beyond it RESOURCE_EXHAUSTED "
        "before any Python runs, so a saturated event loop cannot build an unbounded backlog. None: no limit.",
    )
    # Connection hygiene: what one client connection may hold, and how long.
    # Above any honest client's concurrency on one channel: gRPC clients open streams before they learn the
    # limit, and one beyond it is refused (RST_STREAM) rather than queued.
    max_streams_per_connection: int = Field(
        1024, ge=1, description="Concurrent calls (streams) one HTTP/2 connection may have open."
    )
    keepalive_time_s: float = Field(60.0, gt=0, description="Idle time after which the server pings a client.")
    keepalive_timeout_s: float = Field(20.0, gt=0, description="How long a keepalive ping may go unanswered.")
    min_client_ping_interval_s: float = Field(
        5.0, gt=0, description="Clients pinging more often than this are told off, then disconnected."
    )
    max_connections: int = Field(
        default_factory=default_max_connections,
        ge=1,
        description="Client connections the gRPC port holds at once; past it a new connection is closed as soon "
        "as it is accepted (default: 4,096, or a quarter of the file descriptor limit when that is lower).",
    )
    handshake_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection that has not completed its handshake (TLS, HTTP/2 preface and settings) in this "
        "long is closed, so silent connections do not hold slots (gRPC's own default is 120 s).",
    )
    max_connection_idle_s: float = Field(
        300.0, gt=0, description="A connection with no call for this long is closed (GOAWAY)."
    )
    max_connection_age_s: float = Field(
        1800.0, gt=0, description="A connection this old is closed (GOAWAY), so clients rebalance."
    )
    retry_budget_tokens: float = Field(
        20.0, gt=0, description="Retry budget per downstream (gRPC A6 throttling): tokens; a failed attempt takes one."
    )
    retry_budget_ratio: float = Field(
        0.1,
        gt=0,
        description="Tokens a successful call gives back; retries stop while half the tokens or fewer are left, "
        "so they stay within about this share of the calls.",
    )
    hop_streams: int = Field(
        1,
        ge=0,
        description="Long-lived streams kept to each next hop of the mesh (router, feature service, model service) "
        "that carry this service's internal calls as messages (infermesh.hop_streams: about a quarter less than a "
        "unary call at low load); 0: one unary gRPC call per request, as before.",
    )
    hop_streams_under_load: bool = Field(
        False,
        description="false: a call goes on a hop stream only while no other internal call of this service is in "
        "flight (low load), else as a unary call, which costs less under load; true: every call on a stream that has "
        "room.",
    )
    hop_stream_max_inflight: int = Field(
        256,
        ge=1,
        description="Calls one hop stream may carry at once into this service; more are refused (RESOURCE_EXHAUSTED).",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0, description="How long calls on a connection closed for its age may still finish."
    )
    # TLS (docs/security.md). None of them set: plaintext, the default.
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate (chain) the gRPC API port serves; with tls_key_file it turns TLS on. Re-read "
        "when the file changes. Also presented to the next hop unless tls_client_cert_file is set.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (re-read on change).")
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA of the mesh: verifies client certificates (tls_client_auth) and the server certificate "
        "of every hop this service calls; setting it turns TLS on for outgoing calls.",
    )
    tls_client_auth: bool = Field(
        True,
        description="With TLS on, accept only clients presenting a certificate signed by tls_ca_file (mutual TLS).",
    )
    tls_client_cert_file: Path | None = Field(
        None, description="Certificate presented when calling the next hop, if not tls_cert_file (e.g. a public one)."
    )
    tls_client_key_file: Path | None = Field(None, description="Private key of tls_client_cert_file.")

    @model_validator(mode="after")
    def _check_tls(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file go together: set both or neither")
        if self.tls_cert_file is not None and self.tls_client_auth and self.tls_ca_file is None:
            raise ValueError("tls_client_auth needs tls_ca_file (the CA that signs client certificates)")
        return self

    def server_tls(self) -> ServerTls | None:
        """TLS of the API port; None: plaintext."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return ServerTls(
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_ca_file if self.tls_client_auth else None,
            self.tls_client_auth,
        )

    def client_tls(self) -> ClientTls | None:
        """TLS of the calls this service makes to the next hop; None: plaintext."""
        if self.tls_ca_file is None:
            return None
        if self.tls_client_cert_file is not None:
            return ClientTls(self.tls_ca_file, self.tls_client_cert_file, self.tls_client_key_file)
        return ClientTls(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
