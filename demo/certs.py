"""`make certs`: a development CA and one certificate per service, for TLS and mutual TLS on every hop.

    python -m demo.certs --out .run/certs [--name extra.host ...] [--service-name router=router.mesh ...]

Writes ca.pem (+ ca.key) and <service>.pem / <service>.key for gateway, router, feature_service,
model_service, redis and client (a certificate for tools and tests calling an internal hop). Every certificate is valid
for localhost and 127.0.0.1 (plus any --name, and a service's own --service-name), for both server and
client use. Keys are written 0600. Existing
files are kept unless --force; a development CA only, never for production (docs/security.md).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("gateway", "router", "feature_service", "model_service", "redis", "client")
DEFAULT_NAMES = ("localhost", "127.0.0.1")
VALID_DAYS = 365


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Atomic (a reloading server never reads half a file); private files are 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    temporary.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, private_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, private_format, serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(common_name: str = "infermesh development CA") -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, key)


def issue(
    ca: CertificateAuthority, common_name: str, names: Sequence[str] = DEFAULT_NAMES
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for server and client use, valid for `names` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return certificate, key


def write_ca(ca: CertificateAuthority, out: Path) -> None:
    _write(out / "ca.key", _key_pem(ca.key), private=True)
    _write(out / "ca.pem", ca.certificate.public_bytes(serialization.Encoding.PEM))


def load_ca(out: Path) -> CertificateAuthority:
    certificate = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / 'ca.key'} is not an EC key made by demo.certs")
    return CertificateAuthority(certificate, key)


def write_certificate(ca: CertificateAuthority, out: Path, service: str, names: Sequence[str] = DEFAULT_NAMES) -> None:
    """Key first, then certificate, each replaced atomically (a server reloads when either changes)."""
    certificate, key = issue(ca, service, names)
    _write(out / f"{service}.key", _key_pem(key), private=True)
    _write(out / f"{service}.pem", certificate.public_bytes(serialization.Encoding.PEM))


def make_certs(
    out: Path,
    services: Sequence[str] = SERVICES,
    names: Sequence[str] = DEFAULT_NAMES,
    force: bool = False,
    service_names: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """The CA (kept if present) and a certificate per service (kept if present, unless `force`), valid for `names`
    plus the service's own `service_names` (e.g. its DNS name in compose); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    if (out / "ca.pem").exists() and (out / "ca.key").exists() and not force:
        ca = load_ca(out)
    else:
        ca = new_ca()
        write_ca(ca, out)
        force = True  # certificates of an older CA would not verify
    for service in services:
        if force or not (out / f"{service}.pem").exists() or not (out / f"{service}.key").exists():
            write_certificate(ca, out, service, [*names, *(service_names or {}).get(service, ())])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".run/certs"))
    parser.add_argument("--name", action="append", default=[], help="another DNS name or IP the certificates cover")
    parser.add_argument(
        "--service-name",
        action="append",
        default=[],
        metavar="SERVICE=NAME",
        help="a DNS name only that service's certificate covers (e.g. router=router)",
    )
    parser.add_argument("--force", action="store_true", help="a new CA and new certificates")
    args = parser.parse_args()
    service_names: dict[str, list[str]] = {}
    for item in args.service_name:
        service, _, name = item.partition("=")
        if service not in SERVICES or not name:
            parser.error(f"--service-name {item!r}: expected SERVICE=NAME with SERVICE one of {', '.join(SERVICES)}")
        service_names.setdefault(service, []).append(name)
    out = make_certs(args.out, names=[*DEFAULT_NAMES, *args.name], force=args.force, service_names=service_names)
    print(f"CA: {out / 'ca.pem'}; certificates: {', '.join(f'{out}/{s}.pem' for s in SERVICES)}")


if __name__ == "__main__":
    main()
