"""Raw contents kept apart from a ModelInferRequest without copying (pure; messages built with Triton's own
protobuf, which has the same field numbers)."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from infermesh.errors import InvalidInput
from infermesh.wire import split_raw_contents


def request() -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="fraud", model_version="1", id="r1")
    message.parameters["priority"].int64_param = 2
    message.inputs.add(name="user_id", datatype="BYTES", shape=[1])
    message.inputs.add(name="amount", datatype="FP32", shape=[1])
    message.outputs.add(name="fraud_probability")
    message.raw_input_contents.extend([b"\x02\x00\x00\x00u1", b"\x00\x00\x80\x3f"])
    return message


def test_the_raw_contents_are_views_of_the_bytes_and_the_rest_parses_as_it_was() -> None:
    original = request()
    encoded = original.SerializeToString()
    head, raw = split_raw_contents(encoded)
    assert [bytes(r) for r in raw] == list(original.raw_input_contents)
    assert all(r.obj is encoded for r in raw)  # views of the received bytes: nothing copied
    parsed = pb.ModelInferRequest.FromString(head)
    assert not parsed.raw_input_contents
    original.ClearField("raw_input_contents")
    assert parsed == original


def test_a_request_without_raw_contents_is_kept_whole() -> None:
    message = request()
    message.ClearField("raw_input_contents")
    head, raw = split_raw_contents(message.SerializeToString())
    assert raw == [] and pb.ModelInferRequest.FromString(head) == message


@pytest.mark.parametrize(
    "encoded",
    [
        request().SerializeToString()[:-3],  # a raw content cut short
        b"\x0a\xff\xff\xff\xff\x0f",  # a length beyond the message
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
        b"\x0b\x00",  # a group (wire type 3)
    ],
    ids=["truncated", "overlong-length", "endless-varint", "group"],
)
def test_malformed_bytes_are_invalid_argument(encoded: bytes) -> None:
    with pytest.raises(InvalidInput, match="malformed request"):
        split_raw_contents(encoded)


def test_a_flood_of_tiny_fields_is_refused_before_it_is_walked() -> None:
    flood = b"\x32\x00" * 2_000_000  # two million empty requested outputs in 4 MB
    with pytest.raises(InvalidInput, match="more than 1024 inputs, outputs or parameters"):
        split_raw_contents(flood)
