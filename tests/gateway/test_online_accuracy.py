"""Online accuracy windows (gateway.online_accuracy) against hand-computed values."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from gateway.online_accuracy import OnlineAccuracy

LABELS = [1, 0, 1, 0, 1]
SCORES = [0.9, 0.2, 0.4, 0.6, 0.8]


def test_accuracy_brier_and_auc_match_a_hand_computation() -> None:
    accuracy = OnlineAccuracy(window_s=60, slots=6, min_labels=1)
    accuracy.add("m", "1", LABELS, SCORES, threshold=0.5, now=0.0)
    summary = accuracy.version("m", "1", 0.0).summary(0.0)
    # Right at 0.5: 0.9 (1), 0.2 (0), 0.8 (1); wrong: 0.4 (1), 0.6 (0).
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.36 + 0.04) / 5)
    # Positive above negative in 5 of the 6 pairs (0.4 is below 0.6).
    assert summary["auc"] == pytest.approx(5 / 6)
    gauge = REGISTRY.get_sample_value("infermesh_online_accuracy", {"model": "m", "version": "1"})
    assert gauge == pytest.approx(0.6)
    assert REGISTRY.get_sample_value("infermesh_online_labels", {"model": "m", "version": "1"}) == 5


def test_the_threshold_is_the_models() -> None:
    accuracy = OnlineAccuracy(window_s=60, slots=6, min_labels=1)
    accuracy.add("m", "t", LABELS, SCORES, threshold=0.7, now=0.0)
    assert accuracy.version("m", "t", 0.0).summary(0.0)["accuracy"] == pytest.approx(4 / 5)  # 0.6 now right


def test_labels_leave_the_window_a_slot_at_a_time() -> None:
    accuracy = OnlineAccuracy(window_s=60, slots=6, min_labels=1)
    accuracy.add("w", "1", [1, 1], [0.9, 0.9], threshold=0.5, now=0.0)  # both right
    accuracy.add("w", "1", [0, 0], [0.9, 0.9], threshold=0.5, now=35.0)  # both wrong
    window = accuracy.version("w", "1", 35.0)
    assert window.summary(35.0)["accuracy"] == pytest.approx(0.5)
    assert window.summary(65.0) == pytest.approx({"labels": 2, "accuracy": 0.0, "brier": 0.81})  # the first left
    assert "auc" not in window.summary(65.0)  # one label only: no ranking to judge
    assert window.summary(200.0) == {"labels": 0}


def test_gauges_wait_for_min_labels() -> None:
    accuracy = OnlineAccuracy(window_s=60, slots=6, min_labels=3)
    accuracy.add("few", "1", [1, 0], [0.9, 0.1], threshold=0.5, now=0.0)
    assert REGISTRY.get_sample_value("infermesh_online_accuracy", {"model": "few", "version": "1"}) is None
    accuracy.add("few", "1", [1], [0.1], threshold=0.5, now=1.0)
    assert REGISTRY.get_sample_value("infermesh_online_accuracy", {"model": "few", "version": "1"}) == pytest.approx(
        2 / 3
    )
