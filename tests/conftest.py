"""Shared fixtures: the demo data (as `make demo` builds it) and free-port private services."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's feature views and model repository; built here when `make demo` has not run."""
    configured = Path(os.environ.get("INFERMESH_DEMO_DIR", ROOT / ".run" / "demo"))
    if (configured / ".ready").exists():
        return configured
    from demo.setup import prepare

    built = tmp_path_factory.mktemp("demo")
    prepare(built)
    return built
