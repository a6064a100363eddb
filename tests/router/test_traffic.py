"""Progressive delivery's pure logic (router.traffic): the split and its stickiness, the guard's windows and
verdicts, divergence, and the traffic section's validation (infermesh.model_config)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from infermesh.errors import InvalidInput, ModelFailed, NotFound, Unavailable
from infermesh.model_config import ModelConfig, Traffic, parse_checked, parse_config
from infermesh.tensors import Tensor
from router.traffic import (
    BASELINE,
    CANARY,
    SHADOW,
    Mirror,
    Split,
    TrafficControl,
    Window,
    divergence,
    is_version_failure,
    rolled_back_config,
)


def config(**traffic: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "fraud",
            "inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
            "traffic": traffic,
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def user(value: str) -> Tensor:
    data = np.array([value.encode()], dtype=object)
    return Tensor("user_id", "BYTES", (1,), data)


def test_the_split_follows_its_weights() -> None:
    split = Split.of("fraud", Traffic(baseline="1", split={"1": 90, "2": 10}), {})
    counts = Counter(split.choose(None) for _ in range(20_000))
    assert 0.08 < counts["2"] / 20_000 < 0.12
    assert split.weight("1") == 90 and split.weight("2") == 10


def test_a_sticky_value_always_lands_on_the_same_version_and_only_the_moved_share_moves() -> None:
    users = [f"user-{i}".encode() for i in range(5_000)]
    before = Split.of("fraud", Traffic(baseline="1", split={"1": 90, "2": 10}), {})
    after = Split.of("fraud", Traffic(baseline="1", split={"1": 80, "2": 20}), {})
    first = {u: before.choose(u) for u in users}
    assert all(before.choose(u) == first[u] for u in users)  # sticky
    moved = [u for u in users if after.choose(u) != first[u]]
    assert all(first[u] == "1" for u in moved)  # only from the shrinking version to the growing one
    assert 0.07 < len(moved) / len(users) < 0.13  # about the 10 % that changed hands


def test_a_rolled_back_version_gets_no_traffic() -> None:
    split = Split.of("fraud", Traffic(baseline="1", split={"1": 50, "2": 50}), {"2": "broken"})
    assert {split.choose(None) for _ in range(200)} == {"1"}
    recorded = Traffic(baseline="1", split={"1": 50, "2": 50}, rolled_back={"2": "broken"})
    assert Split.of("fraud", recorded, {}).versions == ("1",)


@pytest.mark.parametrize(
    ("traffic", "problem"),
    [
        ({"baseline": "1", "split": {"1": 90, "2": 5}}, "add up to 100, not 95"),
        ({"baseline": "3", "split": {"1": 90, "2": 10}}, "baseline '3' must be one of"),
        ({"baseline": "1", "split": {"1": 110, "2": -10}}, "must not be negative"),
        ({"baseline": "1", "shadow": ["1"]}, "also answers"),
        ({"baseline": "one"}, "not a version number"),
        ({"baseline": "1", "sticky_input": "nope"}, "not an input"),
        ({"baseline": "1", "cascade": {"model": "big", "when_output_between": [0.7, 0.3]}}, "low <= high"),
    ],
)
def test_an_invalid_traffic_section_is_refused_naming_the_problem(traffic: dict[str, Any], problem: str) -> None:
    body = config(baseline="1").model_dump()
    body["traffic"] = traffic
    with pytest.raises(InvalidInput, match=problem):
        parse_checked("fraud", json.dumps(body))


def test_the_versions_a_traffic_section_names_are_served_and_must_exist() -> None:
    named = config(baseline="1", split={"1": 90, "2": 10}, shadow=["3"])
    assert named.served_versions(["1", "2", "3", "4"]) == ["1", "2", "3"]  # not only the newest (the policy's)
    with pytest.raises(InvalidInput, match="version '3'"):
        named.served_versions(["1", "2"])
    plain = config(baseline="1").model_copy(update={"traffic": None})
    assert plain.served_versions(["1", "2"]) == ["2"]


def test_a_change_of_traffic_alone_keeps_the_serving_config() -> None:
    canary = config(baseline="1", split={"1": 90, "2": 10})
    wider = config(baseline="1", split={"1": 50, "2": 50})
    assert canary.serving_json == wider.serving_json
    assert canary.model_dump_json() != wider.model_dump_json()


def test_the_baseline_is_the_default_version() -> None:
    from infermesh.model_config import ModelEntry

    entry = ModelEntry(config(baseline="1", split={"1": 90, "2": 10}), ["1", "2"])
    assert entry.resolve_version("") == "1"
    assert entry.resolve_version("2") == "2"


def test_a_window_counts_only_its_last_seconds_and_reads_a_p99() -> None:
    clock = Clock()
    window = Window(10, clock)
    for _ in range(198):
        window.record(0.002, failed=False)
    window.record(0.2, failed=False)
    window.record(0.2, failed=True)  # a failure counts as one, not as a latency
    figures = window.figures()
    assert figures.requests == 200 and figures.failures == 1 and figures.error_ratio == 0.005
    assert figures.p99_s is not None and 0.002 <= figures.p99_s < 0.003  # 1 slow in 199: the p99 is fast
    window.record(0.2, failed=False)
    window.record(0.2, failed=False)
    assert window.figures().p99_s == pytest.approx(0.2, rel=0.35)  # 3 slow in 201: the p99 is slow
    clock.now += 11
    assert window.figures().requests == 0


def test_divergence_is_the_mean_difference_and_the_flips_at_the_threshold() -> None:
    served = {"p": Tensor("p", "FP32", (4,), np.array([0.1, 0.4, 0.6, 0.9], dtype=np.float32))}
    other = {"p": Tensor("p", "FP32", (4,), np.array([0.1, 0.6, 0.6, 0.5], dtype=np.float32))}
    found = divergence(served, other, threshold=0.5)
    assert found is not None
    assert found.mean_abs["p"] == pytest.approx(0.15, abs=1e-6)
    assert found.flips == {"p": 1} and found.rows == 4


def test_failures_of_the_version_are_told_from_the_request_s_own() -> None:
    assert is_version_failure(ModelFailed("x")) and is_version_failure(Unavailable("x"))
    assert not is_version_failure(InvalidInput("x")) and not is_version_failure(NotFound("x"))


def test_the_guard_rolls_back_a_failing_canary_once_it_has_enough_requests() -> None:
    clock = Clock()
    rollbacks: list[tuple[str, str, str]] = []
    control = TrafficControl(lambda model, version, reason, _: rollbacks.append((model, version, reason)), clock)
    guarded = config(
        baseline="1", split={"1": 50, "2": 50}, guard={"window_s": 30, "min_requests": 20, "max_error_ratio": 0.1}
    )
    arms = Counter(control.choose(guarded, None) for _ in range(400))
    assert {arm for _, arm in arms} == {BASELINE, CANARY}
    for _ in range(19):
        control.record(guarded, "2", 0.001, failed=True)
        clock.now += 0.3  # within the window of 30 s
    assert rollbacks == []  # fewer than min_requests: no verdict yet
    control.record(guarded, "2", 0.001, failed=True)
    assert rollbacks and rollbacks[0][:2] == ("fraud", "2") and "error ratio" in rollbacks[0][2]
    assert {control.choose(guarded, None) for _ in range(100)} == {("1", BASELINE)}
    # The config that records the rollback keeps it so; a new rollout (another traffic section) starts afresh.
    recorded = parse_config(rolled_back_config(guarded, "2", rollbacks[0][2]))
    assert recorded.traffic is not None and recorded.traffic.split == {"1": 100, "2": 0}
    assert {control.choose(recorded, None) for _ in range(100)} == {("1", BASELINE)}
    retried = config(baseline="1", split={"1": 50, "2": 50})
    assert {version for version, _ in (control.choose(retried, None) for _ in range(200))} == {"1", "2"}


def test_a_slow_canary_is_rolled_back_on_its_p99() -> None:
    clock = Clock()
    rollbacks: list[str] = []
    control = TrafficControl(lambda model, version, reason, _: rollbacks.append(reason), clock)
    guarded = config(
        baseline="1", split={"1": 90, "2": 10}, guard={"min_requests": 10, "max_error_ratio": None, "max_p99_ms": 50}
    )
    for _ in range(9):
        control.record(guarded, "2", 0.2, failed=False)
    assert rollbacks == []
    control.record(guarded, "2", 0.2, failed=False)  # the tenth: judged at once
    assert len(rollbacks) == 1 and rollbacks[0].startswith("p99")
    for _ in range(10):  # requests already on their way to it are counted, but it is not rolled back twice
        control.record(guarded, "2", 0.2, failed=False)
    assert len(rollbacks) == 1


def test_mirrors_go_to_the_shadows_of_the_baseline_and_from_a_guarded_canary_to_the_baseline() -> None:
    control = TrafficControl(lambda *_: None)
    both = config(
        baseline="1", split={"1": 90, "2": 10}, shadow=["3"], guard={"compare_sample": 1.0, "max_divergence": 0.1}
    )
    assert control.mirrors(both, "1") == [Mirror("3", "3", SHADOW)]
    assert control.mirrors(both, "2") == [Mirror("1", "2", CANARY)]
    assert control.mirrors(both, "3") == []
    sampled = config(baseline="1", shadow=["3"], shadow_sample=0.0)
    assert control.mirrors(sampled, "1") == []


def test_a_canary_that_diverges_from_the_baseline_is_rolled_back() -> None:
    rollbacks: list[str] = []
    clock = Clock()
    control = TrafficControl(lambda model, version, reason, _: rollbacks.append(reason), clock)
    guarded = config(
        baseline="1",
        split={"1": 50, "2": 50},
        guard={"min_requests": 5, "max_error_ratio": None, "max_divergence": 0.1, "compare_sample": 1.0},
    )
    for _ in range(5):
        control.record(guarded, "2", 0.001, failed=False)
    served = {"p": Tensor("p", "FP32", (2,), np.array([0.9, 0.9], dtype=np.float32))}
    baseline = {"p": Tensor("p", "FP32", (2,), np.array([0.1, 0.2], dtype=np.float32))}
    control.compared(guarded, Mirror("1", "2", CANARY), served, baseline, 0.001)
    assert len(rollbacks) == 1 and rollbacks[0].startswith("divergence")


def test_the_repository_index_says_what_each_version_does() -> None:
    from infermesh.repository import traffic_role

    traffic = Traffic(baseline="1", split={"1": 90, "2": 10}, shadow=["3"], rolled_back={"4": "p99 80 ms > 50 ms"})
    assert [traffic_role(traffic, v) for v in ("1", "2", "3", "4", "5")] == [
        "baseline 90 %",
        "canary 10 %",
        "shadow",
        "rolled back: p99 80 ms > 50 ms",
        "",
    ]
