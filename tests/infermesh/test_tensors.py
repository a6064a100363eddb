"""OIP tensor codec and signature validation (pure logic)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

# Triton's own messages (same field numbers): this process also imports tritonclient, and protobuf
# refuses two files defining `inference.*` in one process.
from tritonclient.grpc import service_pb2 as pb

from infermesh.errors import InvalidInput
from infermesh.model_config import TensorSpec
from infermesh.tensors import MessageInputs, Tensor, decode_inputs, encode_bytes, to_raw
from infermesh.validation import entity_ids, require_finite, validate_headers, validate_inputs

SPECS = [
    TensorSpec(name="user_id", datatype="BYTES", shape=[-1]),
    TensorSpec(name="amount", datatype="FP32", shape=[-1]),
]


def request_with(*tensors: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    return request


def test_raw_fp32_and_bytes_decode() -> None:
    request = request_with(
        ("user_id", "BYTES", [2]),
        ("amount", "FP32", [2]),
        raw=[encode_bytes(np.array([b"u1", b"u22"], dtype=object)), np.array([1.5, 2.5], "<f4").tobytes()],
    )
    tensors = decode_inputs(request)
    assert list(tensors["user_id"].data) == [b"u1", b"u22"]
    np.testing.assert_array_equal(tensors["amount"].data, np.array([1.5, 2.5], np.float32))


def test_typed_contents_decode() -> None:
    request = request_with(("amount", "FP32", [3]), ("user_id", "BYTES", [1]))
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    request.inputs[1].contents.bytes_contents.append(b"u7")
    tensors = decode_inputs(request)
    assert tensors["amount"].data.tolist() == [1.0, 2.0, 3.0]
    assert tensors["user_id"].data.tolist() == [b"u7"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.zeros(3, "<f4").tobytes(), "raw content is 12 bytes, expected 8"),
        (b"\x01", "expected 8"),
    ],
)
def test_raw_length_mismatch_names_tensor(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=f"input 'amount'.*{message}"):
        decode_inputs(request_with(("amount", "FP32", [2]), raw=[raw]))


def test_bytes_overrun_and_count_mismatch() -> None:
    overrun = struct.pack("<I", 10) + b"abc"
    with pytest.raises(InvalidInput, match="input 'user_id': BYTES element 0 overruns"):
        decode_inputs(request_with(("user_id", "BYTES", [1]), raw=[overrun]))
    two = encode_bytes(np.array([b"a", b"b"], dtype=object))
    with pytest.raises(InvalidInput, match="truncated BYTES length prefix at offset 10"):
        decode_inputs(request_with(("user_id", "BYTES", [3]), raw=[two + b"\0\0\0"]))
    with pytest.raises(InvalidInput, match="raw content is 10 bytes, too short for 3 BYTES elements"):
        decode_inputs(request_with(("user_id", "BYTES", [3]), raw=[two]))
    with pytest.raises(InvalidInput, match="holds more than the 1 BYTES elements its shape needs"):
        decode_inputs(request_with(("user_id", "BYTES", [1]), raw=[two]))


def test_bytes_decoding_is_bounded_by_the_shape_not_by_the_buffer() -> None:
    """Two million one-byte elements under a shape of one: refused from the sizes alone (no element parsed)
    when a longest element is known, else at the second element."""
    flood = encode_bytes(np.array([b"x"] * 2_000_000, dtype=object))
    request = request_with(("user_id", "BYTES", [1]), raw=[flood])
    with pytest.raises(InvalidInput, match="more than 1 BYTES elements of at most 256 bytes"):
        decode_inputs(request, {"user_id": 256})
    with pytest.raises(InvalidInput, match="holds more than the 1 BYTES elements"):
        decode_inputs(request)
    long_id = encode_bytes(np.array([b"u1", b"u" * 300], dtype=object))
    with pytest.raises(InvalidInput, match="input 'user_id': BYTES element 1 is longer than 256 bytes"):
        decode_inputs(request_with(("user_id", "BYTES", [2]), raw=[long_id]), {"user_id": 256})
    typed = request_with(("user_id", "BYTES", [1]))
    typed.inputs[0].contents.bytes_contents.append(b"u" * 300)
    with pytest.raises(InvalidInput, match="input 'user_id': BYTES element 0 is longer than 256 bytes"):
        decode_inputs(typed, {"user_id": 256})


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2**62, 2**62, 0], "holds more than 2147483647 elements"),  # no elements, yet no array can have it
        ([2**62, 2**62, 1], "holds more than 2147483647 elements"),
        ([2**31, 1], "holds more than 2147483647 elements"),
        ([1] * 9, "rank 9 exceeds 8 dimensions"),
        ([1] * 65, "rank 65 exceeds 8 dimensions"),
    ],
)
def test_overflowing_or_deep_shapes_are_invalid_argument(shape: list[int], message: str) -> None:
    request = request_with(("amount", "FP32", shape), raw=[b""])
    with pytest.raises(InvalidInput, match=message):
        decode_inputs(request)
    with pytest.raises(InvalidInput, match=message):
        validate_headers(
            "m",
            [TensorSpec(name="amount", datatype="FP32", shape=[-1] * len(shape))],
            8,
            MessageInputs(request).headers,
        )


def test_headers_are_checked_against_the_signature_before_any_data() -> None:
    """No raw contents at all: every header problem is still found, from the headers alone."""
    cases = [
        ((("user_id", "BYTES", [2]), ("amount", "FP32", [2]), ("x", "FP32", [2])), "input 'x' is not an input"),
        ((("user_id", "BYTES", [2]), ("user_id", "BYTES", [2])), "input 'user_id' appears more than once"),
        ((("user_id", "FP32", [2]), ("amount", "FP32", [2])), "input 'user_id': datatype FP32 does not match BYTES"),
        ((("user_id", "BYTES", [2, 1]), ("amount", "FP32", [2])), r"input 'user_id': shape \[2, 1\] does not match"),
        ((("user_id", "BYTES", [9]), ("amount", "FP32", [9])), "batch size 9 exceeds the max_batch_size 8"),
        ((("user_id", "BYTES", [2]), ("amount", "FP32", [3])), "batch size 3 differs"),
    ]
    for tensors, message in cases:
        with pytest.raises(InvalidInput, match=message):
            validate_headers("m", SPECS, 8, MessageInputs(request_with(*tensors)).headers)
    assert (
        validate_headers(
            "m", SPECS, 8, MessageInputs(request_with(("user_id", "BYTES", [2]), ("amount", "FP32", [2]))).headers
        )
        == 2
    )


def test_raw_and_typed_mix_is_refused() -> None:
    request = request_with(("amount", "FP32", [1]), ("user_id", "BYTES", [1]), raw=[b"\x00" * 4])
    with pytest.raises(InvalidInput, match="2 inputs"):
        decode_inputs(request)


def test_fp16_must_be_raw_and_unknown_datatype() -> None:
    with pytest.raises(InvalidInput, match="input 'h': FP16 data must be sent as raw"):
        decode_inputs(request_with(("h", "FP16", [1])))
    with pytest.raises(InvalidInput, match="input 'x': unknown datatype 'FP8'"):
        decode_inputs(request_with(("x", "FP8", [1])))


def test_negative_dimension_refused() -> None:
    with pytest.raises(InvalidInput, match="negative dimension"):
        decode_inputs(request_with(("amount", "FP32", [-1]), raw=[b""]))


def tensor(name: str, datatype: str, data: np.ndarray) -> Tensor:
    return Tensor(name, datatype, data.shape, data)


def test_validate_inputs_errors_name_the_tensor() -> None:
    ids = tensor("user_id", "BYTES", np.array([b"u1", b"u2"], dtype=object))
    good = {"user_id": ids, "amount": tensor("amount", "FP32", np.ones(2, np.float32))}
    assert validate_inputs("m", SPECS, 8, good) == 2
    cases = {
        "input 'amount': datatype FP64 does not match FP32": {**good, "amount": tensor("amount", "FP64", np.ones(2))},
        r"input 'amount': shape \[2, 1\] does not match \[-1\]": {
            **good,
            "amount": tensor("amount", "FP32", np.ones((2, 1), np.float32)),
        },
        "input 'amount': batch size 3 differs": {**good, "amount": tensor("amount", "FP32", np.ones(3, np.float32))},
        "input 'amount' is missing": {"user_id": ids},
        "input 'extra' is not an input of model 'm'": {**good, "extra": ids},
    }
    for message, tensors in cases.items():
        with pytest.raises(InvalidInput, match=message):
            validate_inputs("m", SPECS, 8, tensors)
    with pytest.raises(InvalidInput, match="input 'user_id': batch size 2 exceeds the max_batch_size 1"):
        validate_inputs("m", SPECS, 1, good)


def test_entity_ids_and_finite_checks() -> None:
    assert entity_ids(tensor("user_id", "BYTES", np.array([b"u1"], dtype=object))) == ["u1"]
    with pytest.raises(InvalidInput, match="element 0 is not valid UTF-8"):
        entity_ids(tensor("user_id", "BYTES", np.array([b"\xff"], dtype=object)))
    with pytest.raises(InvalidInput, match="element 0 is an empty entity id"):
        entity_ids(tensor("user_id", "BYTES", np.array([b""], dtype=object)))
    with pytest.raises(InvalidInput, match="input 'amount': element 1 is NaN"):
        require_finite(tensor("amount", "FP32", np.array([1.0, np.nan], np.float32)))


def test_to_raw_round_trip_bytes() -> None:
    array = np.array([b"", b"xyz"], dtype=object)
    assert to_raw("BYTES", array) == b"\x00\x00\x00\x00\x03\x00\x00\x00xyz"
