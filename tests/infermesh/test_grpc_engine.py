"""The internal services run gRPC core's epoll engine, the gateway EventEngine (docs/performance.md): chosen when
grpc is imported, without leaking the choice to processes they start, and never over an operator's choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import os, sys; import {package}; from infermesh import grpc_engine; "
    "print('grpc' in sys.modules, grpc_engine.chosen, repr(os.environ.get('GRPC_EXPERIMENTS')))"
)


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


@pytest.mark.parametrize("package", ["router", "feature_service", "model_service"])
def test_an_internal_service_imports_grpc_on_the_epoll_engine_and_leaves_no_variable_behind(package: str) -> None:
    # `python -m <service>` imports the package first, so grpc is loaded here, with the variable set only meanwhile.
    assert imported(package) == "True epoll None"


def test_the_gateway_keeps_event_engine() -> None:
    assert imported("gateway") == "False None None"


def test_an_operators_choice_wins() -> None:
    assert imported("router", GRPC_EXPERIMENTS="") == "False None ''"
    assert imported("model_service", GRPC_EXPERIMENTS="event_engine_client") == "False None 'event_engine_client'"
