"""Every service picks gRPC core's epoll engine before grpc is imported (docs/performance.md), unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHOSEN = "-event_engine_client,-event_engine_listener"
PROBE = "import {package}, os, sys; print('grpc' in sys.modules, repr(os.environ.get('GRPC_EXPERIMENTS')))"


def imported(package: str, **env: str) -> str:
    base = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package)],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("package", ["gateway", "router", "feature_service", "model_service"])
def test_the_engine_is_chosen_before_grpc_is_imported(package: str) -> None:
    # `python -m <service>` imports the package first: grpc must not be loaded yet when the variable is set.
    assert imported(package) == f"False '{CHOSEN}'"


def test_an_operators_choice_wins() -> None:
    assert imported("gateway", GRPC_EXPERIMENTS="") == "False ''"
    assert imported("router", GRPC_EXPERIMENTS="event_engine_client") == "False 'event_engine_client'"
