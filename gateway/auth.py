"""Credentials at the gateway: API keys (stored as SHA-256 hashes) and JWTs (RS256/ES256, verified against a
JWKS file), each giving a `Tenant`: the models it may call, its role and its tenant's quota.

The key file (`api_keys.json`; the `role` and `tenants` entries are optional, an absent quota field is unlimited):

    {"keys": [{"sha256": "<64 hex>", "tenant": "acme", "models": ["fraud"], "role": "user"}],
     "tenants": {"acme": {"rate_per_s": 100, "burst": 200, "max_inflight": 32}}}

Both files are re-read by `KeyStore.reload_if_changed` when they change on disk (keys rotate without a restart).
Transport-free: no gRPC here. Never put a key, a hash or a token in a log line or an error message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from infermesh.errors import PermissionDenied, Unauthenticated
from infermesh.watched_file import WatchedFile

log = logging.getLogger(__name__)

BEARER = "bearer "
Role = Literal["user", "admin"]
# Asymmetric only: a symmetric algorithm (HS256) would let whoever reads the JWKS sign tokens, and mixing the
# two kinds is the classic algorithm-confusion attack. Hard-coded, never taken from the token.
ALGORITHMS: Final = ("RS256", "ES256")
VERIFIED_TOKENS: Final = 4096  # tokens remembered as verified (the gate and the handler check each call's)
# header.payload.signature, each base64url (the signature of an unsigned `alg: none` token is empty). API keys
# (`im_` + base64url) hold no dot, so the two kinds of credential cannot be mistaken for one another.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits; None is unlimited. `burst` defaults to max(1, ceil(rate_per_s)) when only a rate
    is given."""

    rate_per_s: float | None = None
    burst: int | None = None
    max_inflight: int | None = None

    def __post_init__(self) -> None:
        if self.burst is None and self.rate_per_s is not None:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate_per_s)))

    @property
    def limited(self) -> bool:
        return self.rate_per_s is not None or self.max_inflight is not None


UNLIMITED: Final = Quota()


@dataclass(frozen=True, slots=True)
class Tenant:
    """One credential's view of its tenant: models and role belong to the credential (two keys of one tenant
    may differ), the quota to the tenant."""

    name: str
    models: frozenset[str]  # "*" allows every model
    role: Role = "user"
    quota: Quota = field(default=UNLIMITED)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """32 random bytes: guessing a key, or finding one from its hash, is out of reach."""
    return "im_" + secrets.token_urlsafe(32)


# The files, validated ----------------------------------------------------------------------------------------


class _Entry(BaseModel):
    # Unknown fields are ignored, as they always were (notes, creation dates).
    model_config = ConfigDict(strict=True, frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    tenant: str = Field(min_length=1)
    models: list[str] = []
    role: Role = "user"


class _QuotaEntry(BaseModel):
    # New section: a misspelt limit would silently mean "unlimited", so unknown fields are refused.
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    rate_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_inflight: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> _QuotaEntry:
        if self.burst is not None and self.rate_per_s is None:
            raise ValueError("burst is given without rate_per_s")
        return self


class _KeyFile(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    keys: list[_Entry] = []
    tenants: dict[str, _QuotaEntry] = {}


class _Claims(BaseModel):
    """The claims a token carries besides the registered ones (exp, iss, aud, nbf, checked by PyJWT)."""

    model_config = ConfigDict(strict=True, frozen=True)

    tenant: str = Field(min_length=1)
    models: list[str] = []
    role: Role = "user"


def _problems(error: ValidationError) -> str:
    """Where and what, never the offending value (it may be a hash)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'file'}: {e['msg']}"
        for e in error.errors(include_url=False, include_input=False, include_context=False)
    )


@dataclass(frozen=True, slots=True)
class _Keys:
    by_hash: dict[str, Tenant]
    quotas: dict[str, Quota]


def _read_key_file(path: Path) -> _Keys:
    try:
        document = _KeyFile.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise ValueError(f"{path}: {_problems(error)}") from None
    quotas = {
        name: Quota(entry.rate_per_s, entry.burst, entry.max_inflight) for name, entry in document.tenants.items()
    }
    by_hash: dict[str, Tenant] = {}
    for index, entry in enumerate(document.keys):
        digest = entry.sha256.lower()
        if digest in by_hash:
            raise ValueError(f"{path}: keys.{index}: the same key hash appears twice")
        quota = quotas.get(entry.tenant, UNLIMITED)
        by_hash[digest] = Tenant(entry.tenant, frozenset(entry.models), entry.role, quota)
    return _Keys(by_hash, quotas)


def _read_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    """`{"keys": [JWK, ...]}`: the RS256 and ES256 public keys that carry a `kid`, by kid."""
    try:
        document = json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError: position only, no content
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{path}: expected {{"keys": [JWK, ...]}}')
    for index, jwk in enumerate(document["keys"]):
        if isinstance(jwk, dict) and any(part in jwk for part in ("d", "p", "q", "k")):
            raise ValueError(f"{path}: keys.{index} holds private or symmetric key material; publish public keys only")
    try:
        key_set = jwt.PyJWKSet.from_dict(document)  # skips keys it cannot use
    except jwt.PyJWTError:
        raise ValueError(f"{path}: no usable key") from None
    keys: dict[str, jwt.PyJWK] = {}
    for key in key_set:
        if key.key_id is None or key.algorithm_name not in ALGORITHMS:
            continue
        if key.key_id in keys:
            raise ValueError(f"{path}: two keys share the kid {key.key_id!r}")
        keys[key.key_id] = key
    if not keys:
        raise ValueError(f"{path}: no {' or '.join(ALGORITHMS)} key with a 'kid'")
    return keys


# JWT failures, most specific first: PyJWT's own messages stay out of the answer.
_TOKEN_ERRORS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience is not accepted"),
    (jwt.InvalidIssuerError, "token issuer is not accepted"),
    (jwt.InvalidAlgorithmError, "token algorithm is not accepted"),
    (jwt.InvalidSignatureError, "token signature is invalid"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
)


class KeyStore:
    """API keys from a key file and, when a JWKS file is configured, JWTs signed by one of its keys."""

    def __init__(
        self,
        path: Path,
        jwks_path: Path | None = None,
        issuer: str = "",
        audience: str = "",
        leeway_s: float = 30.0,
    ) -> None:
        if jwks_path is not None and not (issuer and audience):
            # Without them a token minted for any other service trusting the same signer would be accepted.
            raise ValueError("accepting JWTs needs both an issuer and an audience")
        if leeway_s < 0:
            raise ValueError("leeway_s must be >= 0")
        self.path = path
        self.jwks_path = jwks_path
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._keys = WatchedFile(path, _read_key_file)
        self._jwks = WatchedFile(jwks_path, _read_jwks) if jwks_path is not None else None
        # Tokens verified already, with when they expire (exp + leeway): a client sends the same token with every
        # call, and a signature check costs far more than the lookup. Bounded; emptied on every reload.
        self._verified: dict[str, tuple[Tenant, float]] = {}

    @classmethod
    def load(
        cls,
        path: Path,
        jwks_path: Path | None = None,
        issuer: str = "",
        audience: str = "",
        leeway_s: float = 30.0,
    ) -> KeyStore:
        """Reads the key file (and the JWKS file). A file that does not validate raises ValueError."""
        return cls(path, jwks_path, issuer, audience, leeway_s)

    @property
    def quotas(self) -> Mapping[str, Quota]:
        """Tenants with limits in the key file's `tenants` section; any other tenant is unlimited."""
        return dict(self._keys.value.quotas)

    def quota(self, tenant: str) -> Quota:
        return self._keys.value.quotas.get(tenant, UNLIMITED)

    # Reload ----------------------------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Re-reads a file whose inode, mtime or size changed (else only stats: cheap enough to call every
        second). A file that does not load keeps the previous state and logs one warning (until it changes
        again). True when something was reloaded."""
        reloaded = False
        if self._keys.refresh():
            self._verified.clear()  # tenants' quotas may have changed
            reloaded = True
            log.info("reloaded %s: %d keys", self.path, len(self._keys.value.by_hash))
        if self._jwks is not None and self._jwks.refresh():
            self._verified.clear()  # a signing key may be gone
            reloaded = True
            log.info("reloaded %s: signing keys %s", self._jwks.path, ", ".join(sorted(self._jwks.value)))
        return reloaded

    # Authentication -------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Tenant:
        """`Bearer <api key>` or `Bearer <JWT>`; Unauthenticated with a client-safe message otherwise."""
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <credential>' metadata")
        if not authorization[: len(BEARER)].lower() == BEARER:
            raise Unauthenticated("authorization metadata must be 'Bearer <credential>'")
        credential = authorization[len(BEARER) :].strip()
        if _JWT_SHAPE.fullmatch(credential):
            return self._verify_token(credential)
        # A dict lookup, not a constant-time compare of each entry: the caller chooses the input of SHA-256,
        # never its output, so whatever the lookup's timing tells of the stored digests is of no use to find
        # a key whose hash matches one (a preimage of SHA-256 of 32 random bytes).
        tenant = self._keys.value.by_hash.get(hash_key(credential))
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant

    def _verify_token(self, token: str) -> Tenant:
        if self._jwks is None:
            raise Unauthenticated("tokens are not accepted here")
        verified = self._verified.get(token)
        if verified is not None:
            if time.time() < verified[1]:
                return verified[0]
            del self._verified[token]  # expired since: verified again below, and refused
        keys = self._jwks.value
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("token algorithm is not accepted")
        kid = header.get("kid")
        key = keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("unknown signing key")
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key,
                # The key's own algorithm: an RSA key never verifies an ES256 token, nor the reverse.
                algorithms=[key.algorithm_name],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            message = next((text for kind, text in _TOKEN_ERRORS if isinstance(error, kind)), "invalid token")
            raise Unauthenticated(message) from None
        except (ValueError, TypeError):  # a malformed key or signature the library did not wrap
            raise Unauthenticated("invalid token") from None
        try:
            claims = _Claims.model_validate(payload)
        except ValidationError:
            raise Unauthenticated("token claims are invalid") from None
        tenant = Tenant(claims.tenant, frozenset(claims.models), claims.role, self.quota(claims.tenant))
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = (tenant, float(payload["exp"]) + self.leeway_s)
        return tenant

    @staticmethod
    def authorize(tenant: Tenant, model: str) -> None:
        if not tenant.allows(model):
            raise PermissionDenied(f"tenant '{tenant.name}' may not use model '{model}'")

    @staticmethod
    def authorize_admin(tenant: Tenant) -> None:
        if not tenant.is_admin:
            raise PermissionDenied("the model repository API needs an admin key or token")


def write_key_file(path: Path, api_key: str, tenant: str, models: list[str], *, role: Role = "user") -> None:
    """A key file of one key (its hash only), written whole then renamed into place: a gateway reloading it
    never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"sha256": hash_key(api_key), "tenant": tenant, "models": models, "role": role}
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps({"keys": [entry]}, indent=2))
    os.replace(partial, path)
