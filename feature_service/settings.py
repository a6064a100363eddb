"""Typed settings of the feature service (env prefix FEATURE_SERVICE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from infermesh.settings import ServiceSettings


class FeatureServiceSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FEATURE_SERVICE_", extra="ignore")

    port: int = Field(8021, description="gRPC port; 0 picks a free one (written to port_file).")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis holding the feature vectors (redis:// or rediss:// URL)."
    )
    views_path: Path = Field(Path("feature_views.json"), description="JSON registry of the feature views served.")
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Connect and per-command timeout for Redis; past it a call fails as UNAVAILABLE."
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Redis connections in the pool; more concurrent reads wait (up to redis_timeout_s)."
    )
    max_entities_per_read: int = Field(
        10_000, ge=1, description="Most entity keys one call may read (summed over a batch) or rows it may write."
    )
    key_prefix: str = Field("im", min_length=1, description="Namespace of every key: {prefix}:fv:{view}:{entity_id}.")
