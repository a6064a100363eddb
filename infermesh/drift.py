"""A model version's baseline profile and the population stability index (PSI) of served traffic against it.

The profile is written when a version is built (demo.train does it) as `<version>/profile.json` next to its
model.pt: per input feature and per output, the inner edges of its histogram bins (quantiles of the training
data) and the training data's proportion in each bin. The model service loads it with the version and reports it
to the router in the repository state; the router bins what it serves into the same bins (router.drift).

PSI = sum over bins of (served - expected) * ln(served / expected), proportions floored at `PSI_FLOOR` so that an
empty bin does not make it infinite. The usual bands: under 0.1 stable, 0.1-0.25 drifting, over 0.25 shifted.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infermesh.model_config import ModelConfig

PROFILE_FILE = "profile.json"
PROFILE_VERSION = 1
DEFAULT_BINS = 10
MAX_BINS = 32
MAX_COLUMNS = 256
MAX_PROFILE_BYTES = 128 * 1024  # it travels in every repository snapshot that carries the version
PSI_FLOOR = 1e-4
WARN_PSI = 0.1
PAGE_PSI = 0.25


@dataclass(frozen=True)
class ReferenceHistogram:
    """One column of the training data: `edges` are the inner bin edges, ascending (len(edges) + 1 bins; a value
    equal to an edge falls in the bin above it), `proportions` the share of the training rows in each bin."""

    edges: tuple[float, ...]
    proportions: tuple[float, ...]

    @property
    def bins(self) -> int:
        return len(self.proportions)


@dataclass(frozen=True)
class Profile:
    """A model version's baseline: its input features in the order the model receives them (the joined vector of
    a feature_spec model, else its inputs by name), its outputs, and which output is the prediction."""

    features: dict[str, ReferenceHistogram]
    outputs: dict[str, ReferenceHistogram]
    prediction: str

    def to_json(self) -> str:
        def part(histograms: Mapping[str, ReferenceHistogram]) -> list[dict[str, object]]:
            return [
                {"name": name, "edges": list(h.edges), "proportions": list(h.proportions)}
                for name, h in histograms.items()
            ]

        document = {
            "profile_version": PROFILE_VERSION,
            "prediction": self.prediction,
            "features": part(self.features),
            "outputs": part(self.outputs),
        }
        return json.dumps(document, separators=(",", ":"))


def histogram_of(values: np.ndarray, bins: int = DEFAULT_BINS) -> ReferenceHistogram:
    """Quantile bins of a training column (distinct edges only: a column with few values gets fewer bins)."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    data = data[np.isfinite(data)]
    if data.size == 0:
        raise ValueError("a column without finite values has no histogram")
    # Edges are values of the data ("higher"), so a discrete column's bins hold whole values; an edge at the
    # minimum would only make an empty first bin.
    quantiles = np.quantile(data, np.linspace(0, 1, bins + 1)[1:-1], method="higher")
    edges = np.unique(quantiles.astype(np.float32)).astype(np.float64)
    edges = edges[edges > data.min()]
    counts = np.bincount(np.searchsorted(edges, data, side="right"), minlength=len(edges) + 1)
    proportions = counts / counts.sum()
    return ReferenceHistogram(tuple(float(e) for e in edges), tuple(round(float(p), 6) for p in proportions))


def build_profile(
    features: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], prediction: str, bins: int = DEFAULT_BINS
) -> Profile:
    """The profile of a version from its training data (one array per column) and its outputs on that data."""
    if prediction not in outputs:
        raise ValueError(f"the prediction '{prediction}' is not one of the outputs")
    return Profile(
        {name: histogram_of(column, bins) for name, column in features.items()},
        {name: histogram_of(column, bins) for name, column in outputs.items()},
        prediction,
    )


def parse_profile(text: str) -> Profile:
    """A profile.json, validated: ValueError naming what is wrong."""
    if len(text) > MAX_PROFILE_BYTES:
        raise ValueError(f"profile is {len(text)} bytes, more than {MAX_PROFILE_BYTES}")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"profile is not JSON: {error.msg} at line {error.lineno}") from None
    if not isinstance(document, dict):
        raise ValueError("profile must be a JSON object")
    if document.get("profile_version") != PROFILE_VERSION:
        raise ValueError(f"profile_version must be {PROFILE_VERSION}")
    features = _histograms(document.get("features"), "features")
    outputs = _histograms(document.get("outputs"), "outputs")
    if len(features) + len(outputs) > MAX_COLUMNS:
        raise ValueError(f"profile has more than {MAX_COLUMNS} columns")
    prediction = document.get("prediction")
    if not isinstance(prediction, str) or prediction not in outputs:
        raise ValueError("profile.prediction must name one of its outputs")
    return Profile(features, outputs, prediction)


def profile_for(config: ModelConfig, text: str) -> Profile:
    """A profile.json validated against the model it belongs to: its features must be columns the model receives
    (the joined vector of a feature_spec model, else numeric inputs) and its prediction one of its outputs."""
    profile = parse_profile(text)
    columns = served_columns(config)
    unknown = [name for name in profile.features if name not in columns]
    if unknown:
        raise ValueError(f"profile feature '{unknown[0]}' is not a column the model receives")
    outputs = {spec.name for spec in config.outputs}
    unknown = [name for name in profile.outputs if name not in outputs]
    if unknown:
        raise ValueError(f"profile output '{unknown[0]}' is not an output of the model")
    return profile


def served_columns(config: ModelConfig) -> list[str]:
    """The columns drift can watch: the joined vector of a feature_spec model, else its numeric inputs."""
    if config.feature_spec is not None:
        return config.feature_spec.column_names
    return [spec.name for spec in config.inputs if spec.datatype not in ("BYTES", "BOOL")]


def _histograms(part: object, where: str) -> dict[str, ReferenceHistogram]:
    if not isinstance(part, list):
        raise ValueError(f"profile.{where} must be a list")
    histograms: dict[str, ReferenceHistogram] = {}
    for entry in part:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"profile.{where}: every entry needs a name")
        name = entry["name"]
        if name in histograms:
            raise ValueError(f"profile.{where}: '{name}' appears twice")
        edges, proportions = entry.get("edges"), entry.get("proportions")
        if not _numbers(edges) or not _numbers(proportions):
            raise ValueError(f"profile.{where}.{name}: edges and proportions must be lists of finite numbers")
        assert isinstance(edges, list) and isinstance(proportions, list)
        if len(proportions) != len(edges) + 1 or len(proportions) > MAX_BINS:
            raise ValueError(f"profile.{where}.{name}: needs one proportion more than edges, at most {MAX_BINS}")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"profile.{where}.{name}: edges must be strictly ascending")
        if any(p < 0 for p in proportions) or not math.isclose(sum(proportions), 1.0, abs_tol=1e-3):
            raise ValueError(f"profile.{where}.{name}: proportions must be non-negative and add up to 1")
        histograms[name] = ReferenceHistogram(tuple(map(float, edges)), tuple(map(float, proportions)))
    return histograms


def _numbers(values: object) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def padded_edges(histograms: Sequence[ReferenceHistogram]) -> tuple[np.ndarray, np.ndarray]:
    """The columns' edges as one [columns, most bins - 1] array (padded with +inf: those bins stay empty) and
    their expected proportions as [columns, most bins] (padded with 0)."""
    bins = max(h.bins for h in histograms)
    edges = np.full((len(histograms), bins - 1), np.inf)
    expected = np.zeros((len(histograms), bins))
    for row, histogram in enumerate(histograms):
        edges[row, : len(histogram.edges)] = histogram.edges
        expected[row, : histogram.bins] = histogram.proportions
    return edges, expected


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts per column and bin of `values` [rows, columns] in the bins of `edges` [columns, bins - 1]:
    vectorised (no loop over rows or columns). A NaN falls in the first bin."""
    columns, inner = edges.shape
    index = (values[:, :, None] >= edges[None, :, :]).sum(axis=2)  # [rows, columns]: the bin of each value
    index += np.arange(columns) * (inner + 1)
    return np.bincount(index.ravel(), minlength=columns * (inner + 1)).reshape(columns, inner + 1)


def psi(expected: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """PSI per column of served `counts` [columns, bins] against `expected` proportions [columns, bins]; NaN for a
    column without rows. Bins empty in both add nothing."""
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        actual = counts / totals
    used = (expected > 0) | (counts > 0)
    e = np.maximum(expected, PSI_FLOOR)
    a = np.maximum(actual, PSI_FLOOR)
    terms = np.where(used, (a - e) * np.log(a / e), 0.0)
    result: np.ndarray = terms.sum(axis=1)
    result[totals[:, 0] == 0] = np.nan
    return result
