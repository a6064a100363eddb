"""Connection hygiene: every server's gRPC options come from its settings, with safe defaults."""

from __future__ import annotations

import resource

import pytest

from infermesh.service import connection_options
from infermesh.settings import ServiceSettings, default_max_connections


def test_defaults_bound_every_connection() -> None:
    options = dict(connection_options(ServiceSettings()))
    assert options["grpc.max_concurrent_streams"] == 1024
    assert options["grpc.keepalive_time_ms"] == 60_000 and options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 5_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert options["grpc.max_allowed_incoming_connections"] == default_max_connections()
    assert options["grpc.server_handshake_timeout_ms"] == 10_000


def test_each_limit_follows_its_setting() -> None:
    settings = ServiceSettings(
        max_streams_per_connection=8,
        keepalive_time_s=1.5,
        keepalive_timeout_s=0.5,
        min_client_ping_interval_s=2,
        max_connection_idle_s=9,
        max_connection_age_s=60,
        max_connection_age_grace_s=0,
        max_connections=100,
        handshake_timeout_s=0.25,
    )
    options = dict(connection_options(settings))
    assert options["grpc.max_concurrent_streams"] == 8
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (1_500, 500)
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 2_000
    assert options["grpc.max_connection_idle_ms"] == 9_000
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (60_000, 0)
    assert options["grpc.max_allowed_incoming_connections"] == 100
    assert options["grpc.server_handshake_timeout_ms"] == 250


@pytest.mark.parametrize(
    ("descriptors", "connections"),
    [(1_048_576, 4096), (20_000, 4096), (4096, 1024), (1024, 256), (40, 16), (resource.RLIM_INFINITY, 4096)],
)
def test_the_default_cap_leaves_most_descriptors_to_the_process(
    monkeypatch: pytest.MonkeyPatch, descriptors: int, connections: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (descriptors, resource.RLIM_INFINITY))
    assert default_max_connections() == connections
