"""Outlier ejection of model replicas (pure): consecutive failures, success rate, and the most ejected at once."""

from __future__ import annotations

import time

from router.replicas import Ejection, ReplicaSet


def replica_set(names: list[str], **rules: float) -> ReplicaSet:
    replicas = ReplicaSet(lambda address: None, seed=1, ejection=Ejection(eject_s=60, **rules))  # type: ignore[arg-type]
    replicas.update(names)
    return replicas


def available(replicas: ReplicaSet) -> set[str]:
    now = time.monotonic()
    return {name for name, replica in replicas.replicas.items() if replica.available(now)}


def test_consecutive_failures_eject_and_a_success_in_between_resets_the_count() -> None:
    replicas = replica_set(["a", "b", "c", "d"], consecutive_failures=3)
    a = replicas.replicas["a"]
    replicas.report_failure(a)
    replicas.report_failure(a)
    replicas.report_success(a, 0.001)
    replicas.report_failure(a)
    replicas.report_failure(a)
    assert "a" in available(replicas)
    replicas.report_failure(a)
    assert available(replicas) == {"b", "c", "d"}


def test_a_replica_failing_half_its_calls_is_ejected_by_its_success_rate() -> None:
    replicas = replica_set(["a", "b"], consecutive_failures=100, min_success_rate=0.6, min_calls=20)
    a = replicas.replicas["a"]
    for _ in range(10):  # never 100 failures in a row, but only half of the calls succeed
        replicas.report_success(a, 0.001)
        replicas.report_failure(a)
    assert available(replicas) == {"b"}


def test_never_more_than_the_share_ejected_at_once() -> None:
    replicas = replica_set(["a", "b", "c", "d"], max_ejected_share=0.5)
    for name in ("a", "b", "c", "d"):  # a fault hits every replica
        replicas.report_failure(replicas.replicas[name])
    assert len(available(replicas)) == 2
    two = replica_set(["a", "b"], max_ejected_share=0.0)
    two.report_failure(two.replicas["a"])
    two.report_failure(two.replicas["b"])
    assert len(available(two)) == 1  # at least one may always be ejected (a dead replica of two)
