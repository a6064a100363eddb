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
from infermesh.tensors import Tensor, decode_inputs, encode_bytes, to_raw
from infermesh.validation import entity_ids, require_finite, validate_inputs

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
    with pytest.raises(InvalidInput, match="holds 2 BYTES elements, shape needs 3"):
        decode_inputs(request_with(("user_id", "BYTES", [3]), raw=[two]))


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
