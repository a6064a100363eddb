"""Gateway core: API keys (hashed), tenants' models, admission (pure logic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.auth import KeyStore, hash_key, new_api_key, write_key_file
from gateway.core import Admission, GatewayCore, batch_rows_within
from infermesh.errors import InvalidInput, Overloaded, PermissionDenied, Unauthenticated
from infermesh.model_config import ModelConfig, ModelEntry


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


def entry_with_outputs(outputs: list[dict[str, object]], max_batch_size: int = 1024) -> ModelEntry:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": outputs,
        }
    )
    return ModelEntry(config=config, path=".", versions=["1"])


def test_coalesced_rows_keep_the_response_within_a_message() -> None:
    entry = entry_with_outputs(
        [
            {"name": "small", "datatype": "FP32", "shape": [-1]},
            {"name": "big", "datatype": "FP64", "shape": [-1, 1000]},
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
        ]
    )
    # Only the small output: 4 bytes a row, max_batch_size is the bound.
    assert batch_rows_within(entry, ["small"], 1_000_000) == 1024
    # The 8,000-byte rows of `big` (and `small`): 1,000,000 // 8,004 rows.
    assert batch_rows_within(entry, ["small", "big"], 1_000_000) == 124
    # A row never needs to be refused: at least one row.
    assert batch_rows_within(entry, ["big"], 10) == 1
    # BYTES (all outputs by default): sizes unknown, the coalescer's byte budget for requests bounds it.
    assert batch_rows_within(entry, [], 1_000_000) == 1024


def test_clients_cannot_set_the_mesh_s_own_parameters() -> None:
    GatewayCore.check_parameters(["priority"])
    with pytest.raises(InvalidInput, match="'infermesh_segments' is reserved"):
        GatewayCore.check_parameters(["infermesh_segments"])
