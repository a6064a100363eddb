"""TLS settings, the development certificates of `make certs`, and server credentials that follow their files."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

from demo.certs import SERVICES, issue, load_ca, make_certs, write_certificate
from gateway.settings import GatewaySettings
from infermesh.settings import ServiceSettings
from infermesh.tls import ClientTls, ReloadingServerCredentials, ServerTls
from router.settings import RouterSettings


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_certificates_cover_localhost_for_server_and_client_use(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    for service in SERVICES:
        certificate = x509.load_pem_x509_certificate((certs / f"{service}.pem").read_bytes())
        certificate.verify_directly_issued_by(ca)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["localhost"]
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert os.stat(certs / f"{service}.key").st_mode & 0o777 == 0o600
    assert os.stat(certs / "ca.key").st_mode & 0o777 == 0o600


def test_make_certs_keeps_what_is_there(certs: Path) -> None:
    before = {path.name: path.read_bytes() for path in certs.iterdir()}
    make_certs(certs)
    assert {path.name: path.read_bytes() for path in certs.iterdir()} == before


def test_tls_settings_go_together(certs: Path) -> None:
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file go together"):
        ServiceSettings(tls_cert_file=certs / "router.pem")
    with pytest.raises(ValidationError, match="tls_client_auth needs tls_ca_file"):
        RouterSettings(tls_cert_file=certs / "router.pem", tls_key_file=certs / "router.key")
    assert ServiceSettings().server_tls() is None and ServiceSettings().client_tls() is None  # plaintext default

    router = RouterSettings(
        tls_cert_file=certs / "router.pem", tls_key_file=certs / "router.key", tls_ca_file=certs / "ca.pem"
    )
    assert router.server_tls() == ServerTls(certs / "router.pem", certs / "router.key", certs / "ca.pem", True)
    assert router.client_tls() == ClientTls(certs / "ca.pem", certs / "router.pem", certs / "router.key")

    # The gateway's public port takes clients without certificates unless told otherwise, and may present
    # another certificate to the router than the one it serves.
    gateway = GatewaySettings(
        tls_cert_file=certs / "gateway.pem",
        tls_key_file=certs / "gateway.key",
        tls_ca_file=certs / "ca.pem",
        tls_client_cert_file=certs / "client.pem",
        tls_client_key_file=certs / "client.key",
    )
    assert gateway.server_tls() == ServerTls(certs / "gateway.pem", certs / "gateway.key", None, False)
    assert gateway.client_tls() == ClientTls(certs / "ca.pem", certs / "client.pem", certs / "client.key")


def test_server_credentials_reload_a_changed_pair_and_skip_a_half_written_one(tmp_path: Path) -> None:
    folder = make_certs(tmp_path / "certs", services=["router"])
    credentials = ReloadingServerCredentials(
        ServerTls(folder / "router.pem", folder / "router.key", folder / "ca.pem", True)
    )
    credentials.credentials()
    assert credentials.fetch() is None  # unchanged: the current configuration stays
    ca = load_ca(folder)

    # Caught between the two writes of a rotation: a new key beside the old certificate is not loaded.
    _, new_key = issue(ca, "router")
    (folder / "router.key").write_bytes(
        new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert credentials.fetch() is None and credentials.reloads == 0

    write_certificate(ca, folder, "router")  # a matching pair: loaded once
    assert credentials.fetch() is not None and credentials.reloads == 1
    assert credentials.fetch() is None
