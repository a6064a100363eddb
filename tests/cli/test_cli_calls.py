"""`infermesh models list|load|unload|stats` against a stand-in gateway (tritonclient's protos, the same
messages and field numbers as the mesh's): what is sent, what is printed, and the exit code of each failure."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.cli.runner import run_cli

ADMIN_KEY = "test-cli-admin-key-0123456789"
USER_KEY = "test-cli-user-key-0123456789"
LAST_INFERENCE_MS = 1_700_000_000_123  # 2023-11-14T22:13:20.123+00:00


@dataclass
class FakeGateway(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers the repository and statistics calls like a gateway would, and records what it was sent."""

    calls: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)
    delay_s: float = 0.0

    def _admit(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata())
        self.calls.append((method, request, metadata))
        time.sleep(self.delay_s)
        authorization = metadata.get("authorization", "")
        if authorization not in (f"Bearer {ADMIN_KEY}", f"Bearer {USER_KEY}"):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        if authorization != f"Bearer {ADMIN_KEY}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the repository API needs an admin key")

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("RepositoryIndex", request, context)
        index = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(
            models=[
                index(name="fraud", version="2", state="UNAVAILABLE", reason="SHA-256 mismatch"),
                index(name="fraud", version="10", state="LOADING"),
                index(name="bench_mlp", version="1", state="READY"),
                index(name="fraud", version="1", state="READY"),
            ]
        )

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("ModelStatistics", request, context)
        if request.name == "nope":
            context.abort(grpc.StatusCode.NOT_FOUND, "model 'nope' not found")
        duration = service_pb2.StatisticDuration
        served = service_pb2.ModelStatistics(
            name="fraud",
            version="1",
            last_inference=LAST_INFERENCE_MS,
            inference_count=7,
            execution_count=3,
            inference_stats=service_pb2.InferStatistics(
                success=duration(count=4, ns=10_000_000),
                fail=duration(count=1, ns=1_000_000),
                queue=duration(count=4, ns=2_000_000),
                compute_infer=duration(count=4, ns=6_000_000),
            ),
        )
        idle = service_pb2.ModelStatistics(name="bench_mlp", version="1")
        return service_pb2.ModelStatisticsResponse(model_stats=[served, idle])

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("RepositoryModelLoad", request, context)
        if request.model_name == "broken":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model 'broken': config.json is not valid")
        return service_pb2.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admit("RepositoryModelUnload", request, context)
        return service_pb2.RepositoryModelUnloadResponse()


def serve(servicer: FakeGateway, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def gateway() -> Iterator[tuple[FakeGateway, str]]:
    servicer = FakeGateway()
    server, address = serve(servicer)
    yield servicer, address
    server.stop(None)


def admin(*args: str | Path, **env: str) -> Any:
    return run_cli(*args, INFERMESH_API_KEY=ADMIN_KEY, **env)


def test_list_prints_a_table_sorted_by_model_and_version(gateway: tuple[FakeGateway, str]) -> None:
    servicer, address = gateway
    result = admin("models", "list", "--url", address)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "MODEL      VERSION  STATE        REASON",
        "bench_mlp  1        READY",
        "fraud      1        READY",
        "fraud      2        UNAVAILABLE  SHA-256 mismatch",
        "fraud      10       LOADING",
    ]
    (method, request, metadata) = servicer.calls[0]
    assert method == "RepositoryIndex"
    assert request.ready is False  # every version, not only the ready ones
    assert metadata["authorization"] == f"Bearer {ADMIN_KEY}"
    assert ADMIN_KEY not in result.stdout + result.stderr


def test_list_json_and_the_url_from_the_environment(gateway: tuple[FakeGateway, str]) -> None:
    _, address = gateway
    result = admin("models", "list", "--json", INFERMESH_URL=address)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[:2] == [
        {"name": "bench_mlp", "version": "1", "state": "READY", "reason": ""},
        {"name": "fraud", "version": "1", "state": "READY", "reason": ""},
    ]


def test_stats_table_and_json(gateway: tuple[FakeGateway, str]) -> None:
    servicer, address = gateway
    table = admin("models", "stats", "fraud", "--version", "1", "--url", address)

    assert table.returncode == 0, table.stderr
    header, bench, fraud = table.stdout.splitlines()
    assert header.split() == [
        "MODEL",
        "VERSION",
        "INFERENCES",
        "EXECUTIONS",
        "SUCCESS",
        "SUCCESS_MS",
        "FAIL",
        "QUEUE_MS",
        "INFER_MS",
        "LAST_INFERENCE",
    ]
    assert fraud.split() == ["fraud", "1", "7", "3", "4", "2.5", "1", "0.5", "1.5", "2023-11-14T22:13:20.123+00:00"]
    assert bench.split() == ["bench_mlp", "1", "0", "0", "0", "-", "0", "-", "-", "never"]
    request = servicer.calls[0][1]
    assert (request.name, request.version) == ("fraud", "1")

    as_json = admin("models", "stats", "--json", "--url", address)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)[1] == {
        "name": "fraud",
        "version": "1",
        "inference_count": 7,
        "execution_count": 3,
        "success_count": 4,
        "success_mean_ms": 2.5,
        "fail_count": 1,
        "queue_mean_ms": 0.5,
        "compute_infer_mean_ms": 1.5,
        "last_inference": "2023-11-14T22:13:20.123+00:00",
    }
    assert (servicer.calls[1][1].name, servicer.calls[1][1].version) == ("", "")


def test_load_sends_the_config_file_text_as_tritonclient_does(gateway: tuple[FakeGateway, str], tmp_path: Path) -> None:
    servicer, address = gateway
    config = tmp_path / "fraud.json"
    config.write_text('{"name": "fraud",\n "max_batch_size": 64}\n')

    plain = admin("models", "load", "fraud", "--url", address)
    with_config = admin("models", "load", "fraud", "--config", config, "--url", address)
    unloaded = admin("models", "unload", "fraud", "--url", address, "--json")

    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "loaded fraud"
    assert with_config.returncode == 0, with_config.stderr
    assert unloaded.returncode == 0, unloaded.stderr
    assert json.loads(unloaded.stdout) == {"model": "fraud", "unloaded": True}
    (_, first, _), (_, second, _), (method, third, _) = servicer.calls
    assert first.model_name == "fraud" and dict(first.parameters) == {}
    assert second.parameters["config"].WhichOneof("parameter_choice") == "string_param"
    assert second.parameters["config"].string_param == config.read_text()
    assert (method, third.model_name) == ("RepositoryModelUnload", "fraud")


def test_invalid_config_json_is_a_usage_error_before_any_call(gateway: tuple[FakeGateway, str], tmp_path: Path) -> None:
    servicer, address = gateway
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "fraud",')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")

    for config, message in [(broken, "not valid JSON"), (listed, "JSON object"), (tmp_path / "none.json", "cannot")]:
        result = admin("models", "load", "fraud", "--config", config, "--url", address)

        assert result.returncode == 2
        assert f"--config {config}: " in result.stderr and message in result.stderr
    assert servicer.calls == []


def test_server_errors_print_the_status_and_exit_1(gateway: tuple[FakeGateway, str]) -> None:
    _, address = gateway
    result = admin("models", "load", "broken", "--url", address)

    assert result.returncode == 1
    assert result.stderr.strip() == "error: INVALID_ARGUMENT: model 'broken': config.json is not valid"
    assert result.stdout == ""

    missing = admin("models", "stats", "nope", "--url", address)
    assert missing.returncode == 1
    assert "error: NOT_FOUND: model 'nope' not found" in missing.stderr


def test_missing_key_and_non_admin_key_are_refused_with_a_hint(gateway: tuple[FakeGateway, str]) -> None:
    servicer, address = gateway
    anonymous = run_cli("models", "list", "--url", address)
    user = run_cli("models", "list", "--url", address, INFERMESH_API_KEY=USER_KEY)

    assert anonymous.returncode == 1
    assert "error: UNAUTHENTICATED: missing or unknown API key" in anonymous.stderr
    assert "set INFERMESH_API_KEY" in anonymous.stderr
    assert "authorization" not in servicer.calls[0][2]
    assert user.returncode == 1
    assert "error: PERMISSION_DENIED:" in user.stderr
    assert "admin" in user.stderr
    assert USER_KEY not in user.stdout + user.stderr


def test_an_address_with_nothing_listening_is_unreachable_quickly() -> None:
    with socket.socket() as bound:  # bound, never listening: connections are refused, and no one else gets it
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        started = time.monotonic()
        result = admin("models", "list", "--url", address, "--timeout", "2")
        elapsed = time.monotonic() - started

    assert result.returncode == 3
    assert f"cannot reach {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10


def test_a_slow_answer_past_the_timeout_is_deadline_exceeded(gateway: tuple[FakeGateway, str]) -> None:
    servicer, address = gateway
    servicer.delay_s = 3
    result = admin("models", "list", "--url", address, "--timeout", "1")

    assert result.returncode == 1
    assert "error: DEADLINE_EXCEEDED" in result.stderr


def self_signed(directory: Path) -> tuple[bytes, bytes, Path]:
    """A server key and certificate for 127.0.0.1, and the certificate's PEM file (the CA to trust)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    ca = directory / "ca.pem"
    ca.write_bytes(certificate_pem)
    return key_pem, certificate_pem, ca


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    key_pem, certificate_pem, ca = self_signed(tmp_path)
    servicer = FakeGateway()
    server, address = serve(servicer, grpc.ssl_server_credentials([(key_pem, certificate_pem)]))
    try:
        trusted = admin("models", "list", "--url", address, "--ca", ca, "--json")
        untrusted = admin("models", "list", "--url", address, "--tls", "--timeout", "3")
    finally:
        server.stop(None)

    assert trusted.returncode == 0, trusted.stderr
    assert {"name": "fraud", "version": "1", "state": "READY", "reason": ""} in json.loads(trusted.stdout)
    assert servicer.calls[0][2]["authorization"] == f"Bearer {ADMIN_KEY}"
    # The system's roots do not vouch for a self-signed certificate: no connection.
    assert untrusted.returncode == 3
    assert f"cannot reach {address}" in untrusted.stderr
    assert len(servicer.calls) == 1


def test_usage_errors_exit_2() -> None:
    assert run_cli("models").returncode == 2
    assert run_cli("models", "frobnicate").returncode == 2
    assert run_cli("models", "load").returncode == 2
    no_model = run_cli("models", "stats", "--version", "2")
    assert no_model.returncode == 2
    assert "--version needs a MODEL" in no_model.stderr


def test_help_names_every_command() -> None:
    result = run_cli("models", "--help")

    assert result.returncode == 0
    for command in ("list", "load", "unload", "stats", "publish"):
        assert command in result.stdout
