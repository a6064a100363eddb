"""The pure part of the gateway→router segment protocol (the messages are tested end to end)."""

from __future__ import annotations

import numpy as np
import pytest

from infermesh import errors
from infermesh.segments import SegmentResult, error_of, parse_rows, read_report, report, split_tensors
from infermesh.tensors import Tensor


def test_parse_rows_accepts_counts_that_add_up() -> None:
    assert parse_rows("1,2,3", 6) == [1, 2, 3]


@pytest.mark.parametrize("text", ["", "1,,2", "a", "0,6", "-1,7", "2,2"])
def test_parse_rows_refuses_the_rest(text: str) -> None:
    with pytest.raises(errors.InvalidInput, match="infermesh_segments"):
        parse_rows(text, 6)


def test_split_tensors_gives_each_segment_its_rows_without_copying() -> None:
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    parts = split_tensors({"x": Tensor("x", "FP32", (6, 2), data)}, [1, 3, 2])
    assert [p["x"].shape for p in parts] == [(1, 2), (3, 2), (2, 2)]
    np.testing.assert_array_equal(parts[1]["x"].data, data[1:4])
    assert np.shares_memory(parts[2]["x"].data, data)


def test_report_round_trip_keeps_rows_flags_and_error_classes() -> None:
    text = report(
        [
            SegmentResult(2, parameters={"infermesh_defaulted_entities": "user_id=u9"}),
            SegmentResult(1, error=errors.NotFound("unknown entity user_id=u7")),
            SegmentResult(1, error=errors.QueueFull("queue full")),
            SegmentResult(3),
        ]
    )
    reports = read_report(text, 4)
    assert reports[0] == {"rows": 2, "parameters": {"infermesh_defaulted_entities": "user_id=u9"}}
    assert error_of(reports[0]) is None
    missing = error_of(reports[1])
    assert type(missing) is errors.NotFound and str(missing) == "unknown entity user_id=u7"
    assert type(error_of(reports[2])) is errors.QueueFull
    assert reports[3] == {"rows": 3}


@pytest.mark.parametrize("text", ["not json", "{}", '[{"rows": 1}]'])
def test_malformed_or_short_report_is_unavailable(text: str) -> None:
    with pytest.raises(errors.Unavailable):
        read_report(text, 2)


def test_unknown_error_name_becomes_unavailable() -> None:
    assert type(error_of({"error": "SomethingElse", "message": "x"})) is errors.Unavailable
