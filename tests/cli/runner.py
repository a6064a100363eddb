"""Runs `infermesh` as a user does: in a process of its own. The test process never imports the CLI or
infermesh.proto: tritonclient (which the tests use) registers the same protobuf names, and protobuf refuses
both in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI_ENV = (
    "INFERMESH_API_KEY",
    "INFERMESH_URL",
    "INFERMESH_MODEL_REPOSITORY",
    "INFERMESH_FEATURE_SERVICE_URL",
    "INFERMESH_FEATURE_WRITE_TOKEN",
)


def run_cli(*args: str | Path, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`infermesh ARGS` with only the given INFERMESH_* variables set (none leaks in from the test's shell)."""
    environment = {k: v for k, v in os.environ.items() if k not in CLI_ENV}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "infermesh.cli", *map(str, args)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
