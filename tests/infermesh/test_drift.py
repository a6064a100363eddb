"""Baseline profiles and PSI (infermesh.drift) against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from infermesh.drift import (
    PSI_FLOOR,
    ReferenceHistogram,
    bin_counts,
    build_profile,
    histogram_of,
    padded_edges,
    parse_profile,
    profile_for,
    psi,
)
from infermesh.model_config import ModelConfig


def test_psi_matches_a_hand_computation() -> None:
    expected = np.array([[0.5, 0.5], [0.5, 0.5]])
    counts = np.array([[3, 1], [5, 5]])
    # 0.75 vs 0.5 and 0.25 vs 0.5: 0.25 ln 1.5 + (-0.25) ln 0.5
    assert psi(expected, counts)[0] == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2))
    assert psi(expected, counts)[1] == pytest.approx(0.0)


def test_psi_floors_empty_bins_and_ignores_bins_empty_on_both_sides() -> None:
    expected = np.array([[1.0, 0.0, 0.0]])
    counts = np.array([[0, 0, 4]])
    # bin 0: (1e-4 - 1) ln(1e-4 / 1); bin 2: (1 - 1e-4) ln(1 / 1e-4); bin 1 adds nothing
    term = (1 - PSI_FLOOR) * math.log(1 / PSI_FLOOR)
    assert psi(expected, counts)[0] == pytest.approx(2 * term)


def test_psi_of_a_column_without_rows_is_nan() -> None:
    assert math.isnan(psi(np.array([[0.5, 0.5]]), np.array([[0, 0]]))[0])


def test_bins_put_a_value_on_an_edge_in_the_bin_above_and_pad_short_columns() -> None:
    short = ReferenceHistogram((1.0,), (0.5, 0.5))
    long = ReferenceHistogram((0.0, 10.0), (0.2, 0.6, 0.2))
    edges, expected = padded_edges([short, long])
    assert edges.tolist() == [[1.0, math.inf], [0.0, 10.0]]
    assert expected.tolist() == [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]]
    values = np.array([[0.5, -1.0], [1.0, 0.0], [7.0, 10.0], [1e9, 5.0]])
    assert bin_counts(edges, values).tolist() == [[1, 3, 0], [1, 2, 1]]


def test_histogram_of_training_data_is_its_quantiles() -> None:
    values = np.arange(1000, dtype=np.float64)
    histogram = histogram_of(values, bins=4)
    assert histogram.edges == (250.0, 500.0, 750.0)
    assert histogram.proportions == pytest.approx((0.25, 0.25, 0.25, 0.25))
    counts = histogram_of(np.array([0.0] * 90 + [1.0] * 10), bins=10)  # few values: few bins
    assert counts.edges == (1.0,) and counts.proportions == pytest.approx((0.9, 0.1))


def _config() -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [-1]},
                {"name": "s", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
        }
    )


def test_a_profile_round_trips_and_is_checked_against_its_model() -> None:
    rng = np.random.default_rng(0)
    profile = build_profile({"x": rng.normal(size=500)}, {"p": rng.random(500)}, prediction="p")
    again = profile_for(_config(), profile.to_json())
    assert again == profile
    foreign = build_profile({"s": rng.normal(size=50)}, {"p": rng.random(50)}, prediction="p")
    with pytest.raises(ValueError, match="profile feature 's' is not a column the model receives"):
        profile_for(_config(), foreign.to_json())


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("[]", "must be a JSON object"),
        ("{", "not JSON"),
        ({"profile_version": 9}, "profile_version must be 1"),
        ({"profile_version": 1, "features": {}, "outputs": [], "prediction": "p"}, "features must be a list"),
        (
            {
                "profile_version": 1,
                "features": [],
                "outputs": [{"name": "p", "edges": [2, 1], "proportions": [0.2, 0.3, 0.5]}],
                "prediction": "p",
            },
            "edges must be strictly ascending",
        ),
        (
            {
                "profile_version": 1,
                "features": [],
                "outputs": [{"name": "p", "edges": [1], "proportions": [0.2, 0.3]}],
                "prediction": "p",
            },
            "add up to 1",
        ),
        (
            {
                "profile_version": 1,
                "features": [],
                "outputs": [{"name": "p", "edges": [1], "proportions": [0.5]}],
                "prediction": "p",
            },
            "one proportion more than edges",
        ),
        (
            {
                "profile_version": 1,
                "features": [],
                "outputs": [{"name": "p", "edges": ["a"], "proportions": [0.5, 0.5]}],
                "prediction": "p",
            },
            "lists of finite numbers",
        ),
        (
            {"profile_version": 1, "features": [], "outputs": [], "prediction": "p"},
            "prediction must name one of its outputs",
        ),
    ],
)
def test_a_bad_profile_is_refused_with_its_problem(document: object, problem: str) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(ValueError, match=problem):
        parse_profile(text)
