"""API keys: stored as SHA-256 hashes, each mapped to a tenant and the models it may call."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from infermesh.errors import PermissionDenied, Unauthenticated

BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    models: frozenset[str]  # "*" allows every model

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return "im_" + secrets.token_urlsafe(32)


class KeyStore:
    def __init__(self, tenants_by_hash: dict[str, Tenant]) -> None:
        self._tenants = tenants_by_hash

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        """`{"keys": [{"sha256": "<hex>", "tenant": "demo", "models": ["fraud"]}]}`"""
        document = json.loads(path.read_text())
        tenants: dict[str, Tenant] = {}
        for entry in document.get("keys", []):
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64:
                raise ValueError(f"{path}: sha256 entries must be 64 hex characters")
            tenants[digest] = Tenant(str(entry["tenant"]), frozenset(entry.get("models", [])))
        return cls(tenants)

    def authenticate(self, authorization: str | None) -> Tenant:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        if not authorization[: len(BEARER)].lower() == BEARER:
            raise Unauthenticated("authorization metadata must be 'Bearer <api key>'")
        digest = hash_key(authorization[len(BEARER) :].strip())
        for stored, tenant in self._tenants.items():
            if hmac.compare_digest(stored, digest):
                return tenant
        raise Unauthenticated("invalid API key")

    @staticmethod
    def authorize(tenant: Tenant, model: str) -> None:
        if not tenant.allows(model):
            raise PermissionDenied(f"tenant '{tenant.name}' may not use model '{model}'")


def write_key_file(path: Path, api_key: str, tenant: str, models: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"keys": [{"sha256": hash_key(api_key), "tenant": tenant, "models": models}]}, indent=2))
