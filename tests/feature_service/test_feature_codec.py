"""Unit tests of the pure logic: vector packing/unpacking, statuses and ages, row encoding, proto filling."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from feature_service.codec import NAN_BYTES, build_block, encode_row, pack_vector, unpack_vectors
from feature_service.servicer import fill_read_response
from feature_service.views import FeatureView
from infermesh.errors import InvalidInput
from infermesh.features import FeatureBlock, FeatureStatus
from infermesh.proto import feature_store_pb2 as pb

NOW_MS = 1_700_000_000_000


def test_status_codes_match_the_proto_enum() -> None:
    for status in FeatureStatus:
        name = "FEATURE_STATUS_UNSPECIFIED" if status is FeatureStatus.UNSPECIFIED else status.name
        assert pb.FeatureStatus.Value(name) == status.value


def test_pack_vector_layout_is_int64_time_then_float32_values() -> None:
    packed = pack_vector(123_456_789_012, np.array([1.5, -2.0], dtype=np.float32))
    assert packed == struct.pack("<q", 123_456_789_012) + struct.pack("<ff", 1.5, -2.0)


def test_unpack_vectors_full_missing_short_long_and_malformed() -> None:
    full = pack_vector(NOW_MS, np.array([1, 2, 3], dtype=np.float32))
    short = pack_vector(NOW_MS - 1, np.array([4], dtype=np.float32))  # written before features b, c existed
    long = pack_vector(NOW_MS - 2, np.array([5, 6, 7, 8], dtype=np.float32))  # view lost a trailing feature
    malformed = b"\x01\x02\x03"
    times, values = unpack_vectors([full, None, short, long, malformed], width=3)
    np.testing.assert_array_equal(times, [NOW_MS, 0, NOW_MS - 1, NOW_MS - 2, 0])
    np.testing.assert_array_equal(values[0], [1, 2, 3])
    assert np.isnan(values[1]).all()
    assert values[2, 0] == 4 and np.isnan(values[2, 1:]).all()
    np.testing.assert_array_equal(values[3], [5, 6, 7])
    assert np.isnan(values[4]).all()
    assert values.dtype == np.float32 and times.dtype == np.int64


def test_unpack_vectors_fast_path_keeps_row_order() -> None:
    blobs = [pack_vector(NOW_MS + i, np.full(4, i, dtype=np.float32)) for i in range(5)]
    times, values = unpack_vectors(blobs, width=4)
    np.testing.assert_array_equal(times, NOW_MS + np.arange(5))
    np.testing.assert_array_equal(values, np.repeat(np.arange(5, dtype=np.float32)[:, None], 4, axis=1))


def make_view(max_age_ms: int) -> FeatureView:
    return FeatureView(
        name="v",
        entity_key="id",
        max_age_ms=max_age_ms,
        features=[{"name": "a", "default": 1.5}, {"name": "b", "default": -2.0}, {"name": "c"}],
    )


def test_build_block_statuses_ages_and_defaults() -> None:
    view = make_view(max_age_ms=1_000)
    nan = np.nan
    stored = np.array(
        [
            [1.0, 2.0, 3.0],  # fresh
            [4.0, nan, 6.0],  # fresh, b never written
            [7.0, 8.0, 9.0],  # stale
            [nan, nan, nan],  # missing row
        ],
        dtype=np.float32,
    )
    times = np.array([NOW_MS - 10, NOW_MS - 1_000, NOW_MS - 1_001, 0], dtype=np.int64)
    block, stale_rows = build_block(view, view.feature_names, None, times, stored, NOW_MS)
    P, N, S = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.STALE
    np.testing.assert_array_equal(block.statuses, [[P, P, P], [P, N, P], [S, S, S], [N, N, N]])
    np.testing.assert_array_equal(block.values, [[1, 2, 3], [4, -2, 6], [7, 8, 9], [1.5, -2, 0]])
    np.testing.assert_array_equal(block.ages_ms, [[10, 10, 10], [1000, -1, 1000], [1001, 1001, 1001], [-1, -1, -1]])
    assert stale_rows == 1
    assert block.values.dtype == np.float32 and block.statuses.dtype == np.uint8 and block.ages_ms.dtype == np.int64
    assert block.feature_names == ("a", "b", "c") and block.view == "v"


def test_build_block_selects_columns_in_the_order_asked() -> None:
    view = make_view(max_age_ms=0)
    stored = np.array([[1.0, np.nan, 3.0]], dtype=np.float32)
    times = np.array([NOW_MS - 10**9], dtype=np.int64)  # very old, but max_age 0 means never stale
    block, stale_rows = build_block(view, ("c", "b", "a"), np.array([2, 1, 0]), times, stored, NOW_MS)
    np.testing.assert_array_equal(block.values, [[3, -2, 1]])
    np.testing.assert_array_equal(
        block.statuses, [[FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.PRESENT]]
    )
    assert stale_rows == 0


def test_build_block_clamps_future_event_times_to_age_zero() -> None:
    view = make_view(max_age_ms=1_000)
    block, _ = build_block(
        view, view.feature_names, None, np.array([NOW_MS + 500]), np.ones((1, 3), np.float32), NOW_MS
    )
    np.testing.assert_array_equal(block.ages_ms, [[0, 0, 0]])


def test_encode_row_partial_row_has_nan_for_features_not_given() -> None:
    view = make_view(max_age_ms=0)
    packed, partial = encode_row(view, 0, {"b": 5.0}, NOW_MS)
    assert partial
    assert packed == struct.pack("<q", NOW_MS) + NAN_BYTES + struct.pack("<f", 5.0) + NAN_BYTES
    packed, partial = encode_row(view, 0, {"c": 3.0, "a": 1.0, "b": 2.0}, np.int64(NOW_MS))
    assert not partial
    assert packed == struct.pack("<qfff", NOW_MS, 1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("values", "event_time_ms", "message"),
    [
        ({"a": 1.0, "zz": 2.0, "yy": 3.0}, NOW_MS, "feature view 'v' has no features ['yy', 'zz']"),
        ({}, NOW_MS, "row 3 has no feature values"),
        ({"a": float("nan")}, NOW_MS, "row 3 has non-finite values (NaN, ±inf or beyond float32) for ['a']"),
        ({"a": 1.0, "b": float("inf")}, NOW_MS, "row 3 has non-finite values (NaN, ±inf or beyond float32) for ['b']"),
        ({"c": float("-inf")}, NOW_MS, "for ['c']"),
        ({"a": 1e39}, NOW_MS, "for ['a']"),  # finite as a double, inf as the float32 stored
        ({"a": 1.0}, 0, "row 3 event_time_ms must be Unix epoch milliseconds"),
        ({"a": 1.0}, -5, "row 3 event_time_ms must be Unix epoch milliseconds"),
        ({"a": 1.0}, 1.5e12, "row 3 event_time_ms must be Unix epoch milliseconds"),
        ({"a": 1.0}, 2**60, "row 3 event_time_ms must be Unix epoch milliseconds"),
    ],
)
def test_encode_row_rejects_bad_rows(values: dict[str, float], event_time_ms: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        encode_row(make_view(max_age_ms=0), 3, values, event_time_ms)  # type: ignore[arg-type]


@pytest.mark.parametrize(("entities", "features"), [(1, 1), (10, 50), (3, 0), (0, 4)])
def test_fill_read_response_equals_plain_field_assignment(entities: int, features: int) -> None:
    rng = np.random.default_rng(entities * 100 + features)
    block = FeatureBlock(
        view="v",
        feature_names=tuple(f"f{i}" for i in range(features)),
        values=rng.normal(size=(entities, features)).astype(np.float32),
        statuses=rng.integers(1, 4, size=(entities, features)).astype(np.uint8),
        ages_ms=rng.integers(-1, 2**40, size=(entities, features)).astype(np.int64),
    )
    message = pb.ReadFeaturesResponse()
    fill_read_response(message, block)
    expected = pb.ReadFeaturesResponse(
        feature_view="v",
        feature_names=list(block.feature_names),
        values=block.values.ravel().tolist(),
        statuses=block.statuses.ravel().tolist(),
        ages_ms=block.ages_ms.ravel().tolist(),
    )
    assert message == expected
    assert len(message.values) == entities * features


def test_build_block_all_present_with_a_stale_row() -> None:
    view = make_view(max_age_ms=1_000)
    stored = np.arange(6, dtype=np.float32).reshape(2, 3)
    times = np.array([NOW_MS - 5_000, NOW_MS - 5], dtype=np.int64)
    block, stale_rows = build_block(view, view.feature_names, None, times, stored, NOW_MS)
    np.testing.assert_array_equal(block.values, stored)
    np.testing.assert_array_equal(block.statuses, [[3, 3, 3], [1, 1, 1]])
    np.testing.assert_array_equal(block.ages_ms, [[5_000] * 3, [5] * 3])
    assert stale_rows == 1
    assert block.values.flags.c_contiguous and block.values.flags.writeable  # a copy, not a view of the reply


def test_encode_row_refuses_an_event_time_beyond_the_allowed_skew_naming_the_entity() -> None:
    view = make_view(max_age_ms=0)
    encode_row(view, 0, {"a": 1.0}, NOW_MS + 1_000, entity_id="u7", latest_event_time_ms=NOW_MS + 1_000)  # at the edge
    with pytest.raises(InvalidInput, match=re.escape("row 2 (entity 'u7') has event_time_ms")) as refused:
        encode_row(view, 2, {"a": 1.0}, NOW_MS + 3_601_000, entity_id="u7", latest_event_time_ms=NOW_MS + 1_000)
    assert "3600 s beyond the allowed clock skew" in str(refused.value)
