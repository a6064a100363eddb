"""A batch of segments between the gateway and the router, pure parts (the messages are tested end to end)."""

from __future__ import annotations

import numpy as np
import pytest

from infermesh import errors
from infermesh.dataplane import InferRequest
from infermesh.segments import MAX_SEGMENTS, Segment, check_segments, merge, split_tensors
from infermesh.tensors import DecodedInputs, InputHeader, RawInputs, Tensor, to_raw


def test_segments_that_cover_the_batch_are_accepted() -> None:
    check_segments([Segment(1), Segment(2), Segment(3)], 6)


@pytest.mark.parametrize(
    "rows", [[], [0, 6], [-1, 7], [2, 2], [7], [1] * (MAX_SEGMENTS + 1)], ids=lambda r: str(r)[:20]
)
def test_segments_that_do_not_add_up_are_refused(rows: list[int]) -> None:
    with pytest.raises(errors.InvalidInput, match="segment"):
        check_segments([Segment(r) for r in rows], 6)


def test_split_tensors_gives_each_segment_its_rows_without_copying() -> None:
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    parts = split_tensors({"x": Tensor("x", "FP32", (6, 2), data)}, [1, 3, 2])
    assert [p["x"].shape for p in parts] == [(1, 2), (3, 2), (2, 2)]
    np.testing.assert_array_equal(parts[1]["x"].data, data[1:4])
    assert np.shares_memory(parts[2]["x"].data, data)


def _request(request_id: str, ids: list[bytes], amounts: list[float], raw: bool) -> InferRequest:
    tensors = {
        "user_id": Tensor("user_id", "BYTES", (len(ids),), np.array(ids, dtype=object)),
        "amount": Tensor("amount", "FP32", (len(amounts),), np.array(amounts, dtype=np.float32)),
    }
    inputs = (
        RawInputs([InputHeader(t.name, t.datatype, t.shape) for t in tensors.values()], DecodedInputs(tensors).raw())
        if raw
        else DecodedInputs(tensors)
    )
    return InferRequest("fraud", "", inputs, id=request_id, outputs=["p"], parameters={"priority": 2})


def test_merge_keeps_each_request_s_rows_id_and_parameters_in_order() -> None:
    first = _request("a", [b"u1"], [1.0], raw=True)
    second = _request("b", [b"u2", b"u3"], [2.0, 3.0], raw=False)  # typed: encoded once, here
    batch = merge("fraud", "1", [first, second], [1, 2])
    assert (batch.model, batch.version, batch.outputs) == ("fraud", "1", ["p"])
    assert [(s.rows, s.id, dict(s.parameters)) for s in batch.segments] == [
        (1, "a", {"priority": 2}),
        (2, "b", {"priority": 2}),
    ]
    assert [h.shape for h in batch.inputs.headers] == [(3,), (3,)]
    assert batch.inputs.raw()[0] == to_raw("BYTES", np.array([b"u1", b"u2", b"u3"], dtype=object))
    tensors = batch.inputs.tensors()
    assert list(tensors["user_id"].data) == [b"u1", b"u2", b"u3"]
    np.testing.assert_array_equal(tensors["amount"].data, np.array([1.0, 2.0, 3.0], dtype=np.float32))


def test_raw_inputs_are_checked_when_decoded() -> None:
    header = InputHeader("amount", "FP32", (2,))
    with pytest.raises(errors.InvalidInput, match="input 'amount': raw content is 4 bytes, expected 8"):
        RawInputs([header], [b"\0" * 4]).tensors()
    with pytest.raises(errors.InvalidInput, match="appears more than once"):
        RawInputs([header, header], [b"\0" * 8] * 2).tensors()
    with pytest.raises(errors.InvalidInput, match="raw"):
        RawInputs([header], []).tensors()
