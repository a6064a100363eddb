"""Settings from FEATURE_SERVICE_* env variables, and the servicer before warm-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from feature_service.servicer import FeatureStoreServicer
from feature_service.settings import FeatureServiceSettings
from infermesh.errors import Unavailable
from infermesh.proto import feature_store_pb2 as pb


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("FEATURE_SERVICE_")]:
        monkeypatch.delenv(name)
    settings = FeatureServiceSettings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.views_path == Path("feature_views.json")
    assert settings.redis_timeout_s == 1.0
    assert settings.max_entities_per_read == 10_000
    assert settings.key_prefix == "im"


def test_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURE_SERVICE_REDIS_URL", "redis://10.0.0.5:6380/2")
    monkeypatch.setenv("FEATURE_SERVICE_VIEWS_PATH", "/etc/views.json")
    monkeypatch.setenv("FEATURE_SERVICE_REDIS_TIMEOUT_S", "0.25")
    monkeypatch.setenv("FEATURE_SERVICE_MAX_ENTITIES_PER_READ", "64")
    monkeypatch.setenv("FEATURE_SERVICE_KEY_PREFIX", "staging")
    monkeypatch.setenv("FEATURE_SERVICE_PORT", "50051")
    monkeypatch.setenv("REDIS_URL", "redis://ignored:1/0")  # only the prefixed name counts
    settings = FeatureServiceSettings()
    assert settings.redis_url == "redis://10.0.0.5:6380/2"
    assert settings.views_path == Path("/etc/views.json")
    assert settings.redis_timeout_s == 0.25
    assert settings.max_entities_per_read == 64
    assert settings.key_prefix == "staging"
    assert settings.port == 50051


@pytest.mark.parametrize(("name", "value"), [("REDIS_TIMEOUT_S", "0"), ("MAX_ENTITIES_PER_READ", "0")])
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"FEATURE_SERVICE_{name}", value)
    with pytest.raises(ValidationError):
        FeatureServiceSettings()


async def test_servicer_before_warm_up_is_unavailable() -> None:
    servicer = FeatureStoreServicer()
    with pytest.raises(Unavailable, match="feature service is starting"):
        await servicer.ReadFeatures(pb.ReadFeaturesRequest(feature_view="user", entity_ids=["u1"]), None)  # type: ignore[arg-type]
