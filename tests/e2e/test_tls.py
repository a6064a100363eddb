"""TLS on every hop of a real mesh, with certificates made by `make certs`' code: inference over TLS with
tritonclient, internal hops that refuse clients without a mesh certificate, clients that refuse a server the
mesh CA did not sign, and a certificate rotated without a restart. (tests/e2e/test_inference.py runs the main
inference checks on this mesh too.)"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as aioclient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.certs import load_ca, make_certs, write_certificate
from demo.mesh import LocalMesh
from demo.processes import ServiceProcess
from demo.redis_server import supports_tls
from infermesh.tls import ClientTls
from tests.cli.runner import run_cli
from tests.e2e.meshes import auth, fraud_inputs


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA with its own `client` certificate: valid TLS, but not the mesh's."""
    return make_certs(tmp_path_factory.mktemp("other_ca"), services=["client"])


def certs(mesh: LocalMesh) -> Path:
    assert mesh.options.tls_dir is not None
    return mesh.options.tls_dir


def health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """SERVING, or the status code of a refused call."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return str(error.code())
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def internal(mesh: LocalMesh) -> dict[str, ServiceProcess]:
    assert mesh.router is not None and mesh.feature_service is not None
    return {"router": mesh.router, "feature_service": mesh.feature_service, "model_service": mesh.model_services[0]}


async def test_the_mesh_answers_inference_over_tls(tls_mesh: LocalMesh) -> None:
    ca = str(certs(tls_mesh) / "ca.pem")
    async with aioclient.InferenceServerClient(tls_mesh.gateway_address, ssl=True, root_certificates=ca) as client:
        result = await client.infer("fraud", fraud_inputs(["u1", "u2"], ["m1", "m2"], [3.0, 900.0]), headers=auth())
        probabilities = result.as_numpy("fraud_probability")
        assert probabilities is not None and probabilities.shape == (2,)
        assert ((probabilities >= 0) & (probabilities <= 1)).all()


def test_the_gateway_port_speaks_only_tls(tls_mesh: LocalMesh) -> None:
    assert health(tls_mesh.gateway_address, None) == "StatusCode.UNAVAILABLE"
    # A public client needs no certificate of its own (tls_client_auth is off at the gateway by default).
    ca = (certs(tls_mesh) / "ca.pem").read_bytes()
    assert health(tls_mesh.gateway_address, grpc.ssl_channel_credentials(ca)) == "SERVING"


@pytest.mark.parametrize("hop", ["router", "feature_service", "model_service"])
def test_an_internal_hop_accepts_only_clients_with_a_mesh_certificate(
    tls_mesh: LocalMesh, other_ca: Path, hop: str
) -> None:
    directory = certs(tls_mesh)
    address = internal(tls_mesh)[hop].address
    mesh_ca = directory / "ca.pem"
    member = ClientTls(mesh_ca, directory / "client.pem", directory / "client.key")
    assert health(address, member.credentials()) == "SERVING"
    assert health(address, None) == "StatusCode.UNAVAILABLE"  # plaintext
    assert health(address, ClientTls(mesh_ca).credentials()) == "StatusCode.UNAVAILABLE"  # no certificate
    stranger = ClientTls(mesh_ca, other_ca / "client.pem", other_ca / "client.key")
    assert health(address, stranger.credentials()) == "StatusCode.UNAVAILABLE"  # another CA's certificate


def test_a_client_refuses_a_server_the_mesh_ca_did_not_sign(tls_mesh: LocalMesh, other_ca: Path) -> None:
    directory = certs(tls_mesh)
    assert tls_mesh.router is not None
    # Trusting only the other CA, a client with a valid mesh certificate refuses the router's certificate.
    trusting_another_ca = ClientTls(other_ca / "ca.pem", directory / "client.pem", directory / "client.key")
    assert health(tls_mesh.router.address, trusting_another_ca.credentials()) == "StatusCode.UNAVAILABLE"


def served_certificate(address: str, directory: Path) -> x509.Certificate:
    """The certificate a new TLS connection to `address` is shown (a mutual TLS handshake, as gRPC makes it)."""
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    context.load_cert_chain(directory / "client.pem", directory / "client.key")
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(tls_mesh: LocalMesh) -> None:
    directory = certs(tls_mesh)
    router = tls_mesh.router
    assert router is not None and router.process is not None
    pid = router.process.pid
    before = served_certificate(router.address, directory)
    assert before == x509.load_pem_x509_certificate((directory / "router.pem").read_bytes())

    write_certificate(load_ca(directory), directory, "router")  # a new key and certificate, written in place
    rotated = x509.load_pem_x509_certificate((directory / "router.pem").read_bytes())
    assert rotated.serial_number != before.serial_number
    deadline = time.monotonic() + 10
    while (seen := served_certificate(router.address, directory)) != rotated:
        # The key and the certificate are two files: a connection between the two writes still sees the old pair.
        assert time.monotonic() < deadline, f"still serving serial {seen.serial_number}"
    assert seen.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != before.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert router.alive and router.process.pid == pid  # no restart
    # The mesh keeps working: the gateway's calls through the rotated router verify against the same CA.
    member = ClientTls(directory / "ca.pem", directory / "client.pem", directory / "client.key")
    assert health(router.address, member.credentials()) == "SERVING"


def test_redis_is_reached_over_tls_with_a_password_no_command_line_holds(tls_mesh: LocalMesh) -> None:
    redis_server, feature_service = tls_mesh.redis, tls_mesh.feature_service
    assert redis_server is not None and redis_server.password_file is not None and feature_service is not None
    password = redis_server.password_file.read_bytes()
    assert feature_service.settings["redis_password_file"] == redis_server.password_file.resolve()
    for process in (redis_server.process, feature_service.process):
        assert process is not None
        for view in ("cmdline", "environ"):
            assert password not in Path(f"/proc/{process.pid}/{view}").read_bytes()
    assert password.decode() not in feature_service.log_tail(400)
    if not supports_tls():
        pytest.skip("this redis-server was built without TLS: the mesh reaches it in plaintext")
    assert redis_server.url.startswith("rediss://")
    assert feature_service.settings["redis_ca_file"] == certs(tls_mesh) / "ca.pem"


def test_the_features_cli_reaches_the_feature_service_with_a_mesh_certificate_and_writes_with_the_token(
    tls_mesh: LocalMesh, tmp_path: Path
) -> None:
    directory = certs(tls_mesh)
    tls = ["--ca", directory / "ca.pem", "--cert", directory / "client.pem", "--key", directory / "client.key"]
    url = ["--url", tls_mesh.feature_service_address()]
    rows = tmp_path / "users.csv"
    rows.write_text(f"user_id,event_time_ms,txn_count_24h\ntls-user,{time.time_ns() // 1_000_000},7\n")
    token = tls_mesh.feature_write_token
    assert (tls_mesh.write_token_file.stat().st_mode & 0o777) == 0o600
    ingested = run_cli("features", "ingest", "user", rows, *url, *tls, "--json", INFERMESH_FEATURE_WRITE_TOKEN=token)
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["written"] == 1
    got = run_cli("features", "get", "user", "tls-user", *url, *tls, "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["found"] is True
    # Without a client certificate the handshake fails: the CLI cannot reach the service at all.
    refused = run_cli("features", "get", "user", "tls-user", *url, "--ca", directory / "ca.pem")
    assert refused.returncode == 3 and "TLS handshake failed" in refused.stderr
