"""Smoke test of `make gameday`: `python -m bench.gameday --quick` injects every fault into a mesh of its own and
finds each one's metric moved. A process of its own (it imports the mesh's protobuf modules, tests use
tritonclient)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_fault_of_the_game_day_is_revealed_by_its_metric(demo_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gameday", "--quick", "--demo-dir", str(demo_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "6 of 6 faults revealed" in done.stdout
    for metric in (
        "infermesh_feature_drift_psi",
        "infermesh_forward_seconds",
        "infermesh_feature_defaults_used_total",
        "infermesh_feature_stale_total",
        "infermesh_admission_rejected_total",
        "infermesh_replicas_up",
    ):
        assert metric in done.stdout, metric
