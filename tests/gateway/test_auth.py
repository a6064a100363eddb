"""Gateway credentials (pure, no network): API keys by hash, JWTs verified against a JWKS file, roles, tenant
quotas, and reloading both files without a restart."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import gateway.auth
from gateway.auth import KeyStore, Quota, Tenant, hash_key, new_api_key, write_key_file
from infermesh.errors import Unauthenticated

ISSUER = "https://issuer.example"
AUDIENCE = "infermesh-gateway"
QUOTAS = {"acme": {"rate_per_s": 100, "burst": 200, "max_inflight": 32}, "slow": {"rate_per_s": 2.5}}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


def write_json(path: Path, document: object) -> None:
    """Rewrites in place (same inode) and moves mtime on by a second: a rewrite of the same size within one
    clock tick is still seen."""
    before = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    path.write_text(json.dumps(document))
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def key_file(entries: list[dict[str, Any]], tenants: dict[str, Any] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"keys": entries}
    if tenants is not None:
        document["tenants"] = tenants
    return document


def entry(key: str, tenant: str = "acme", models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"sha256": hash_key(key), "tenant": tenant, "models": ["fraud"] if models is None else models, **extra}


class Mesh:
    """A key file and a JWKS file on disk, the store reading them, and a way to mint tokens."""

    def __init__(self, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
        self.rsa_key, self.ec_key = rsa_key, ec_key
        self.key = new_api_key()
        self.keys_path = tmp_path / "api_keys.json"
        self.jwks_path = tmp_path / "jwks.json"
        write_json(self.keys_path, key_file([entry(self.key)], QUOTAS))
        write_json(self.jwks_path, {"keys": [public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1")]})
        self.store = KeyStore.load(self.keys_path, jwks_path=self.jwks_path, issuer=ISSUER, audience=AUDIENCE)

    def token(self, alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "tenant": "acme", **claims}
        payload = {name: value for name, value in payload.items() if value is not None}  # None: leave it out
        key = self.rsa_key if alg == "RS256" else self.ec_key
        kid = kid or ("rsa-1" if alg == "RS256" else "ec-1")
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def mesh(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Mesh:
    return Mesh(tmp_path, rsa_key, ec_key)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def refusal(store: KeyStore, credential: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        store.authenticate(f"Bearer {credential}")
    return str(caught.value)


# JWTs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_valid_token_gives_the_claimed_tenant_models_role_and_the_tenants_quota(mesh: Mesh, alg: str) -> None:
    tenant = mesh.store.authenticate(f"Bearer {mesh.token(alg, models=['fraud', 'bench_mlp'], role='admin')}")
    assert tenant == Tenant(
        "acme", frozenset({"fraud", "bench_mlp"}), "admin", Quota(rate_per_s=100, burst=200, max_inflight=32)
    )
    assert tenant.is_admin
    assert tenant.allows("bench_mlp") and not tenant.allows("other")


def test_token_claims_default_to_no_models_and_the_user_role(mesh: Mesh) -> None:
    tenant = mesh.store.authenticate(f"Bearer {mesh.token(tenant='newco')}")
    assert tenant == Tenant("newco", frozenset(), "user", Quota())
    assert not tenant.is_admin and not tenant.allows("fraud")
    slow = mesh.store.authenticate(f"bearer {mesh.token('ES256', tenant='slow', models=['*'])}")
    assert slow.quota == Quota(rate_per_s=2.5, burst=3) and slow.allows("anything")


def forged(mesh: Mesh, alg: str, kid: str = "rsa-1") -> str:
    """A token whose header names `alg`, signed as an attacker would: HS256 with the RSA public key (what a
    verifier that trusts the header would use as its HMAC secret), or unsigned."""
    now = int(time.time())
    header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "tenant": "acme", "models": ["*"], "role": "admin"}
    payload = b64(json.dumps(claims).encode())
    if alg == "none":
        return f"{header}.{payload}."
    public_pem = mesh.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def tampered(token: str) -> str:
    """The claims changed after signing (admin role, every model), the signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(unb64(payload))
    claims.update(role="admin", models=["*"])
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


def bad_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    raw = bytearray(unb64(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64(bytes(raw))}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: m.token(exp=int(time.time()) - 120), "token expired"),
        (lambda m: m.token("ES256", exp=int(time.time()) - 120), "token expired"),
        (lambda m: m.token(nbf=int(time.time()) + 120), "token not yet valid"),
        (lambda m: m.token(iss="https://elsewhere.example"), "token issuer is not accepted"),
        (lambda m: m.token(aud="another-service"), "token audience is not accepted"),
        (lambda m: m.token(aud=["another-service", "a-third"]), "token audience is not accepted"),
        (lambda m: m.token(exp=None), "token lacks a required claim"),
        (lambda m: m.token(aud=None), "token lacks a required claim"),
        (lambda m: m.token(kid="rsa-2"), "unknown signing key"),
        (lambda m: m.token("ES256", kid="rsa-1"), "token algorithm is not accepted"),
        (lambda m: forged(m, "HS256"), "token algorithm is not accepted"),
        (lambda m: forged(m, "none"), "token algorithm is not accepted"),
        (lambda m: tampered(m.token()), "token signature is invalid"),
        (lambda m: tampered(m.token("ES256")), "token signature is invalid"),
        (lambda m: bad_signature(m.token()), "token signature is invalid"),
        (lambda m: m.token(tenant=None), "token claims are invalid"),
        (lambda m: m.token(tenant=7), "token claims are invalid"),
        (lambda m: m.token(role="root"), "token claims are invalid"),
        (lambda m: "e30.e30.c2ln", "token algorithm is not accepted"),  # {}.{}.sig: no alg at all
        (lambda m: "bm90.anNvbg.c2ln", "invalid token"),  # not JSON
    ],
    ids=[
        "expired",
        "expired-es256",
        "not-yet-valid",
        "wrong-issuer",
        "wrong-audience",
        "wrong-audiences",
        "no-exp",
        "no-aud",
        "unknown-kid",
        "es256-with-the-rsa-kid",
        "hs256-alg-confusion",
        "alg-none",
        "tampered-claims",
        "tampered-claims-es256",
        "flipped-signature-bit",
        "no-tenant",
        "tenant-not-a-string",
        "unknown-role",
        "empty-header",
        "garbage",
    ],
)
def test_a_bad_token_is_unauthenticated_with_a_client_safe_message(mesh: Mesh, make: Any, message: str) -> None:
    assert refusal(mesh.store, make(mesh)) == message


def test_leeway_tolerates_a_little_clock_skew(tmp_path: Path, mesh: Mesh) -> None:
    just_expired = mesh.token(exp=int(time.time()) - 10)
    assert mesh.store.authenticate(f"Bearer {just_expired}").name == "acme"  # default leeway 30 s
    soon_valid = mesh.token(nbf=int(time.time()) + 10)
    assert mesh.store.authenticate(f"Bearer {soon_valid}").name == "acme"
    strict = KeyStore.load(mesh.keys_path, mesh.jwks_path, issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    assert refusal(strict, just_expired) == "token expired"
    assert refusal(strict, soon_valid) == "token not yet valid"


def test_a_token_is_verified_once_until_it_expires_and_the_memory_is_bounded(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate and the handler both authenticate each call: its token's signature is checked once, and the
    memory of it ends at its expiry (+ leeway), at a reload, or when VERIFIED_TOKENS newer ones displace it."""
    store = KeyStore.load(mesh.keys_path, mesh.jwks_path, issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    decoded: list[str] = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda token, *a, **k: decoded.append(token) or real_decode(token, *a, **k))
    now = time.time()
    token = mesh.token(exp=int(now) + 2)
    assert store.authenticate(f"Bearer {token}").name == "acme"
    assert store.authenticate(f"Bearer {token}").name == "acme"
    assert decoded == [token]  # verified once
    monkeypatch.setattr(time, "time", lambda: now + 10)  # past its exp (PyJWT keeps the real clock)
    store.authenticate(f"Bearer {token}")
    assert decoded == [token, token]  # remembered no longer than it is valid: checked again
    monkeypatch.setattr(time, "time", lambda: now)
    monkeypatch.setattr(gateway.auth, "VERIFIED_TOKENS", 2)
    tokens = [mesh.token(tenant=f"t{n}") for n in range(3)]
    for each in tokens:
        store.authenticate(f"Bearer {each}")
    assert list(store._verified) == tokens[1:]  # the oldest gave way


def test_a_remembered_token_is_refused_once_its_signing_key_is_rotated_out(mesh: Mesh) -> None:
    token = mesh.token()
    assert mesh.store.authenticate(f"Bearer {token}").name == "acme"
    write_json(mesh.jwks_path, {"keys": [public_jwk(mesh.ec_key, "ec-1")]})
    assert mesh.store.reload_if_changed()
    assert refusal(mesh.store, token) == "unknown signing key"


def test_tokens_are_refused_without_a_jwks_and_api_keys_still_work(mesh: Mesh) -> None:
    keys_only = KeyStore.load(mesh.keys_path)
    assert refusal(keys_only, mesh.token()) == "tokens are not accepted here"
    assert keys_only.authenticate(f"Bearer {mesh.key}").name == "acme"
    assert mesh.store.authenticate(f"Bearer {mesh.key}").name == "acme", "API keys next to JWTs"


def test_a_jwks_needs_an_issuer_and_an_audience(mesh: Mesh) -> None:
    with pytest.raises(ValueError, match="issuer and an audience"):
        KeyStore.load(mesh.keys_path, mesh.jwks_path, audience=AUDIENCE)
    with pytest.raises(ValueError, match="issuer and an audience"):
        KeyStore.load(mesh.keys_path, mesh.jwks_path, issuer=ISSUER)


def test_a_jwks_with_private_key_material_is_refused(mesh: Mesh) -> None:
    private = {**RSAAlgorithm.to_jwk(mesh.rsa_key, as_dict=True), "kid": "rsa-1"}
    write_json(mesh.jwks_path, {"keys": [private]})
    with pytest.raises(ValueError, match=r"jwks\.json: keys\.0 holds private or symmetric key material") as caught:
        KeyStore.load(mesh.keys_path, mesh.jwks_path, issuer=ISSUER, audience=AUDIENCE)
    assert private["d"] not in str(caught.value)


def test_jwks_keys_without_a_kid_or_of_another_algorithm_are_not_used(mesh: Mesh) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    unnamed = ECAlgorithm.to_jwk(mesh.ec_key.public_key(), as_dict=True)
    write_json(mesh.jwks_path, {"keys": [unnamed, public_jwk(p384, "p384")]})
    with pytest.raises(ValueError, match="no RS256 or ES256 key with a 'kid'"):
        KeyStore.load(mesh.keys_path, mesh.jwks_path, issuer=ISSUER, audience=AUDIENCE)


# API keys, roles, quotas ---------------------------------------------------------------------------------------


def test_roles_models_and_quotas_are_parsed(tmp_path: Path) -> None:
    admin, user, other = new_api_key(), new_api_key(), new_api_key()
    path = tmp_path / "api_keys.json"
    entries = [entry(admin, models=["*"], role="admin"), entry(user, role="user"), entry(other, tenant="solo")]
    write_json(path, key_file(entries, QUOTAS))
    store = KeyStore.load(path)
    acme = Quota(rate_per_s=100, burst=200, max_inflight=32)
    assert store.authenticate(f"Bearer {admin}") == Tenant("acme", frozenset({"*"}), "admin", acme)
    assert store.authenticate(f"Bearer {user}") == Tenant("acme", frozenset({"fraud"}), "user", acme)
    assert store.authenticate(f"Bearer {other}") == Tenant("solo", frozenset({"fraud"}), "user", Quota())
    assert store.quota("slow") == Quota(rate_per_s=2.5, burst=3, max_inflight=None)
    assert store.quota("solo") == Quota() and store.quotas == {"acme": acme, "slow": Quota(2.5, 3)}


def test_burst_defaults_to_the_rate_rounded_up() -> None:
    assert Quota(rate_per_s=2.5).burst == 3
    assert Quota(rate_per_s=0.2).burst == 1
    assert Quota(rate_per_s=2.5, burst=10).burst == 10
    assert Quota(max_inflight=4).burst is None


def test_a_tenant_is_hashable_and_compares_by_value() -> None:
    one = Tenant("acme", frozenset({"fraud"}), "admin", Quota(rate_per_s=1))
    same = Tenant("acme", frozenset({"fraud"}), "admin", Quota(rate_per_s=1, burst=1))
    assert one == same and len({one, same}) == 1 and one.is_admin
    assert Tenant("acme", frozenset()) != Tenant("acme", frozenset(), "admin")


def test_the_original_key_file_format_still_loads(tmp_path: Path) -> None:
    key = new_api_key()
    path = tmp_path / "api_keys.json"
    write_json(path, {"keys": [{"sha256": hash_key(key).upper(), "tenant": "demo", "models": ["fraud"]}]})
    assert KeyStore.load(path).authenticate(f"Bearer {key}") == Tenant("demo", frozenset({"fraud"}))


def test_write_key_file_writes_the_role(tmp_path: Path) -> None:
    key = new_api_key()
    path = tmp_path / "keys" / "api_keys.json"
    write_key_file(path, key, "acme", ["fraud"], role="admin")
    assert KeyStore.load(path).authenticate(f"Bearer {key}").is_admin
    assert key not in path.read_text() and [p.name for p in path.parent.iterdir()] == ["api_keys.json"]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (lambda h: key_file([{"sha256": h[:-1], "tenant": "acme"}]), r"keys\.0\.sha256: String should match"),
        (lambda h: key_file([{"sha256": h, "tenant": "acme", "role": "root"}]), r"keys\.0\.role: Input should be"),
        (lambda h: key_file([{"sha256": h, "models": ["fraud"]}]), r"keys\.0\.tenant: Field required"),
        (lambda h: key_file([{"sha256": h, "tenant": "acme", "models": "fraud"}]), r"keys\.0\.models"),
        (lambda h: key_file([{"sha256": h, "tenant": "a"}, {"sha256": h, "tenant": "b"}]), r"keys\.1: the same key"),
        (lambda h: key_file([{"sha256": h, "tenant": "a"}], {"a": {"rate": 5}}), r"tenants\.a\.rate: Extra inputs"),
        (lambda h: key_file([{"sha256": h, "tenant": "a"}], {"a": {"burst": 5}}), "burst is given without rate_per_s"),
        (lambda h: key_file([{"sha256": h, "tenant": "a"}], {"a": {"rate_per_s": -1}}), r"rate_per_s: Input should"),
        (lambda h: key_file([{"sha256": h, "tenant": "a"}], {"a": {"max_inflight": 0}}), r"max_inflight: Input"),
        (lambda h: ["not", "an", "object", h], "Input should be an object"),
    ],
    ids=[
        "short-hash",
        "unknown-role",
        "no-tenant",
        "models-not-a-list",
        "duplicate-hash",
        "unknown-quota-field",
        "burst-without-rate",
        "negative-rate",
        "zero-inflight",
        "not-an-object",
    ],
)
def test_a_malformed_key_file_names_the_file_and_the_problem_never_the_hash(
    tmp_path: Path, document: Any, problem: str
) -> None:
    digest = hash_key(new_api_key())
    path = tmp_path / "api_keys.json"
    write_json(path, document(digest))
    with pytest.raises(ValueError, match=problem) as caught:
        KeyStore.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert digest[:-1] not in str(caught.value)


def test_a_key_file_that_is_not_json_raises_value_error(tmp_path: Path) -> None:
    digest = hash_key(new_api_key())
    path = tmp_path / "api_keys.json"
    path.write_text('{"keys": [{"sha256": "' + digest + '", "tenant": ')
    with pytest.raises(ValueError, match="Invalid JSON") as caught:
        KeyStore.load(path)
    assert str(path) in str(caught.value) and digest not in str(caught.value)


@pytest.mark.parametrize("credential", [new_api_key(), "im_demo_change_me", "a.b", "x" * 200])
def test_an_unknown_api_key_is_refused(mesh: Mesh, credential: str) -> None:
    assert refusal(mesh.store, credential) == "invalid API key"


# Reload -------------------------------------------------------------------------------------------------------


def test_a_rotated_api_key_is_picked_up_and_the_old_one_refused(mesh: Mesh) -> None:
    assert not mesh.store.reload_if_changed(), "nothing changed yet"
    old, new = mesh.key, new_api_key()
    write_key_file(mesh.keys_path, new, "acme", ["fraud"])  # renamed into place: a new inode
    assert mesh.store.reload_if_changed()
    assert refusal(mesh.store, old) == "invalid API key"
    assert mesh.store.authenticate(f"Bearer {new}").name == "acme"
    assert not mesh.store.reload_if_changed()


def test_a_same_size_rewrite_in_place_is_seen_by_its_mtime(mesh: Mesh) -> None:
    new = new_api_key()
    before = mesh.keys_path.stat()
    write_json(mesh.keys_path, key_file([entry(new)], QUOTAS))
    after = mesh.keys_path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size), "only the mtime tells"
    assert mesh.store.reload_if_changed()
    assert mesh.store.authenticate(f"Bearer {new}").name == "acme"
    assert refusal(mesh.store, mesh.key) == "invalid API key"


def test_quota_changes_reach_new_authentications(mesh: Mesh) -> None:
    write_json(mesh.keys_path, key_file([entry(mesh.key)], {"acme": {"max_inflight": 4}}))
    assert mesh.store.reload_if_changed()
    assert mesh.store.authenticate(f"Bearer {mesh.key}").quota == Quota(max_inflight=4)
    assert mesh.store.authenticate(f"Bearer {mesh.token()}").quota == Quota(max_inflight=4)


def test_an_unchanged_file_is_only_stat_ed(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_read(path: Path) -> Any:
        raise AssertionError(f"{path} re-read although unchanged")

    monkeypatch.setattr(gateway.auth, "_read_key_file", must_not_read)
    monkeypatch.setattr(gateway.auth, "_read_jwks", must_not_read)
    for _ in range(3):
        assert not mesh.store.reload_if_changed()


def test_a_broken_rewrite_keeps_the_old_keys_and_warns_once(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    digest = hash_key(new_api_key())
    write_json(mesh.keys_path, {"keys": [{"sha256": digest[:40], "tenant": "acme"}]})
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert not mesh.store.reload_if_changed()
        assert not mesh.store.reload_if_changed()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "api_keys.json not reloaded" in warnings[0] and "sha256" in warnings[0]
    assert digest[:40] not in warnings[0] and hash_key(mesh.key) not in warnings[0]
    assert mesh.store.authenticate(f"Bearer {mesh.key}").name == "acme", "the previous keys stay"
    assert mesh.store.authenticate(f"Bearer {mesh.token()}").quota.max_inflight == 32, "and the quotas"

    mesh.keys_path.unlink()
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert not mesh.store.reload_if_changed()
    assert "FileNotFoundError" in caplog.records[-1].getMessage()
    assert mesh.store.authenticate(f"Bearer {mesh.key}").name == "acme", "a vanished file keeps them too"

    fixed = new_api_key()
    write_key_file(mesh.keys_path, fixed, "acme", ["fraud"])
    assert mesh.store.reload_if_changed()
    assert mesh.store.authenticate(f"Bearer {fixed}").name == "acme"


def test_a_rotated_signing_key_is_picked_up_and_a_broken_jwks_keeps_the_old_one(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    old_token = mesh.token()
    mesh.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_json(mesh.jwks_path, {"keys": [public_jwk(mesh.rsa_key, "rsa-2")]})
    assert mesh.store.reload_if_changed()
    assert refusal(mesh.store, old_token) == "unknown signing key"
    assert mesh.store.authenticate(f"Bearer {mesh.token(kid='rsa-2')}").name == "acme"
    assert refusal(mesh.store, mesh.token("ES256")) == "unknown signing key", "ec-1 was dropped"

    write_json(mesh.jwks_path, {"keys": []})
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert not mesh.store.reload_if_changed()
    assert any("jwks.json not reloaded" in record.getMessage() for record in caplog.records)
    assert mesh.store.authenticate(f"Bearer {mesh.token(kid='rsa-2')}").name == "acme"
