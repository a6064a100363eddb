"""Gateway core: API keys (hashed), tenants' models, admission (pure logic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.auth import KeyStore, hash_key, new_api_key, write_key_file
from gateway.core import Admission
from infermesh.errors import Overloaded, PermissionDenied, Unauthenticated


@pytest.fixture
def keys(tmp_path: Path) -> tuple[KeyStore, str]:
    key = new_api_key()
    path = tmp_path / "keys.json"
    write_key_file(path, key, "acme", ["fraud"])
    return KeyStore.load(path), key


def test_key_file_holds_only_the_hash(tmp_path: Path, keys: tuple[KeyStore, str]) -> None:
    _, key = keys
    text = (tmp_path / "keys.json").read_text()
    assert key not in text
    assert json.loads(text)["keys"][0]["sha256"] == hash_key(key)


def test_authenticate_and_authorize(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    tenant = store.authenticate(f"Bearer {key}")
    assert tenant.name == "acme"
    store.authorize(tenant, "fraud")
    with pytest.raises(PermissionDenied, match="tenant 'acme' may not use model 'other'"):
        store.authorize(tenant, "other")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer wrong-key", "Bearer "])
def test_missing_or_wrong_key_is_unauthenticated(keys: tuple[KeyStore, str], header: str | None) -> None:
    store, _ = keys
    with pytest.raises(Unauthenticated):
        store.authenticate(header)


def test_admission_refuses_beyond_limit_and_recovers() -> None:
    admission = Admission(2)
    with admission, admission:
        with pytest.raises(Overloaded), admission:
            pass
        assert admission.inflight == 2
    assert admission.inflight == 0
    with admission:
        assert admission.inflight == 1
