"""Typed settings of the model service (env prefix MODEL_SERVICE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from infermesh.settings import ServiceSettings


class ModelServiceSettings(ServiceSettings):
    """Settings of one model service replica. The model services alone read the model repository; the router and
    gateway learn models from them."""

    model_config = SettingsConfigDict(env_prefix="MODEL_SERVICE_", extra="ignore")

    model_repository: Path = Field(
        Path("model_repository"), description="Folder of <model>/config.json (+ <version>/ weights)."
    )
    require_pinned_digest: bool = Field(
        True,
        description="Serve only versions whose weights match the SHA-256 their config.json pins (version_digests); "
        "false: a version without a pin is checked against its .sha256 sidecar instead (corruption, not tampering).",
    )
    port: int = Field(8031, description="gRPC port; 0 picks a free one (written to port_file).")
    device: str = Field(
        "auto", description="Torch device for every model: auto (cuda if available, else cpu), cpu, cuda, cuda:N."
    )
    torch_threads: int = Field(1, ge=1, description="Intra-op threads torch may use for one forward pass.")
    amp: bool = Field(False, description="Run forward passes under torch.autocast (float16); only applies on CUDA.")
    replica_id: str = Field("", description="Name of this replica, reported in infer response parameters and metadata.")
    repository_poll_s: float = Field(
        0.0,
        ge=0.0,
        description="Poll mode: re-read the model repository this often and load, reload or unload what changed "
        "(0: off; models change through the repository API only).",
    )
    unload_grace_s: float = Field(
        2.0,
        ge=0.0,
        description="How long a version announced as UNLOADING keeps serving, so that every router (which polls "
        "replica states each repository_refresh_s) stops sending to it first.",
    )
    cold_window_s: float = Field(
        60.0,
        ge=0.0,
        description="Cold starts (M8): requests a version serves within this many seconds of becoming READY count as "
        "cold (infermesh_cold_requests_total); the first one's latency is kept. 0: not counted.",
    )
    inline_forward_max_us: int = Field(
        500,
        ge=0,
        description="A forward pass that recently took under this many microseconds runs on the event loop when "
        "nothing else is queued, instead of a hand-off to the worker thread and back (two thread wake-ups); 0: never.",
    )
    inject_delay_ms: float = Field(
        0.0, ge=0.0, description="Test/bench only: extra delay per batch, to simulate a slow replica."
    )
