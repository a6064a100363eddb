"""Unit tests of the feature view registry file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from demo import synthetic
from demo.seed import write_demo_views
from feature_service.views import load_views, parse_views


def view(name: str = "user", features: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "entity_key": "user_id",
        "features": [{"name": "a"}] if features is None else features,
        **extra,
    }


def test_load_views_keeps_declared_order_defaults_and_max_age(tmp_path: Path) -> None:
    path = tmp_path / "views.json"
    features = [{"name": "z", "default": 3.0, "description": "last letter"}, {"name": "a"}]
    path.write_text(json.dumps({"views": [view(features=features, max_age_ms=5_000)]}))
    views = load_views(path)
    user = views["user"]
    assert list(views) == ["user"]
    assert user.feature_names == ("z", "a")
    assert user.index == {"z": 0, "a": 1}
    np.testing.assert_array_equal(user.defaults, np.array([3.0, 0.0], dtype=np.float32))
    assert user.max_age_ms == 5_000 and user.entity_key == "user_id" and user.width == 2
    assert user.features[0].description == "last letter"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"views": [view(), view()]}, "duplicate feature views"),
        ({"views": [view(features=[{"name": "a"}, {"name": "a"}])]}, "duplicate features"),
        ({"views": [view(name="us:er")]}, "should match pattern"),  # ':' would make keys ambiguous
        ({"views": [view(features=[])]}, "at least 1 item"),
        ({"views": [view(max_age_ms=-1)]}, "greater than or equal to 0"),
        ({"views": [view(unknown=1)]}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_registries_are_rejected(document: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        parse_views(document)


def test_demo_views_match_the_synthetic_world(tmp_path: Path) -> None:
    path = tmp_path / "demo" / "views.json"
    write_demo_views(path)
    views = load_views(path)
    assert views["user"].feature_names == tuple(synthetic.USER_FEATURES)
    assert views["merchant"].feature_names == tuple(synthetic.MERCHANT_FEATURES)
    assert views["user"].entity_key == "user_id" and views["merchant"].entity_key == "merchant_id"
    assert views["user"].max_age_ms == synthetic.USER_MAX_AGE_MS
    assert views["merchant"].max_age_ms == synthetic.MERCHANT_MAX_AGE_MS
    assert views["user"].defaults.tolist() == [default for default, _ in synthetic.USER_FEATURES.values()]
