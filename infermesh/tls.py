"""TLS on every hop: server credentials that follow their files (rotation without a restart) and client
credentials that verify the next hop and present this service's certificate (mutual TLS).

Plain mode is what a service gets with no certificate settings. A server with a certificate and key serves TLS;
with `tls_client_auth` (the default of internal services) it accepts only clients whose certificate the CA
signed. A client with a CA verifies the server against it and presents its own certificate.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What an outgoing channel needs: the CA that signed the servers, and the certificate presented to them."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the server's certificate must carry when the target is an address (replicas found through DNS
    # are called by IP); None: the target's host.
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Read now: a channel keeps the credentials it was made with (see docs/security.md, rotation)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file is not None else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file is not None else None,
        )


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # verifies client certificates
    require_client_cert: bool = True


def _signature(path: Path) -> tuple[int, int, int]:
    # Follows symlinks: a Kubernetes Secret volume swaps its ..data link, which changes the target's identity.
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _check_pair(key_pem: bytes, chain_pem: bytes) -> None:
    """Raises ValueError unless the key belongs to the chain's first certificate: a rotation caught between
    writing the new key and the new certificate is not loaded (every handshake would fail)."""
    certificate = x509.load_pem_x509_certificate(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, spki) != certificate.public_key().public_bytes(
        serialization.Encoding.PEM, spki
    ):
        raise ValueError("the private key does not belong to the certificate")


class ReloadingServerCredentials:
    """Server credentials whose certificate, key and client CA are re-read when their files change.

    gRPC calls `fetch` before every new connection's handshake; it costs a stat per file, and reads the files
    only when one changed. Connections already open keep the certificate they were made with. A change that
    cannot be used (a half-written file, a key that does not parse or belong to the certificate) keeps the last
    good configuration and logs a warning; the next connection tries again.
    """

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()  # gRPC may call fetch from several of its threads
        self._files = [tls.cert_file, tls.key_file, *([tls.ca_file] if tls.ca_file is not None else [])]
        self._signatures = self._current_signatures()
        self.reloads = 0

    def _current_signatures(self) -> list[tuple[int, int, int]]:
        return [_signature(path) for path in self._files]

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        tls = self.tls
        key, chain = tls.key_file.read_bytes(), tls.cert_file.read_bytes()
        _check_pair(key, chain)
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=tls.ca_file.read_bytes() if tls.ca_file is not None else None
        )

    def credentials(self) -> grpc.ServerCredentials:
        # Read (and fail) at start: a service with unreadable certificates does not start.
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self.fetch, require_client_authentication=self.tls.require_client_cert
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                signatures = self._current_signatures()
                if signatures == self._signatures:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError, TypeError) as error:
                fields = {"error": type(error).__name__}
                log.warning("TLS files changed but could not be read", extra={"fields": fields})
                return None
            self._signatures = signatures
            self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"cert_file": os.fspath(self.tls.cert_file)}})
        return configuration
