"""The REST form of the Open Inference Protocol ↔ domain types: JSON tensors and Triton's binary tensor
extension, and the refusals that come before any tensor is built."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from gateway import rest_codec
from infermesh.dataplane import InferResponse
from infermesh.errors import InvalidInput
from infermesh.tensors import Tensor, decode_raw


def body(inputs: list[dict[str, Any]], **fields: Any) -> bytes:
    return json.dumps({"inputs": inputs, **fields}).encode()


def tensors(raw_body: bytes, header_length: str | None = None) -> dict[str, np.ndarray]:
    request, _ = rest_codec.infer_request("m", "", raw_body, header_length)
    pairs = zip(request.inputs.headers, request.inputs.raw(), strict=True)
    return {h.name: decode_raw(h.name, h.datatype, h.shape, raw) for h, raw in pairs}


def test_json_tensors_become_raw_inputs_row_major() -> None:
    values = tensors(
        body(
            [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [3, 4]]},
                {"name": "ids", "datatype": "BYTES", "shape": [2], "data": ["u1", "ü2"]},
                {"name": "flag", "datatype": "BOOL", "shape": [1], "data": [True]},
                {"name": "n", "datatype": "INT64", "shape": [3], "data": [1, -2, 2**40]},
            ]
        )
    )
    assert values["x"].tolist() == [[1.0, 2.5], [3.0, 4.0]]
    assert values["ids"].tolist() == [b"u1", "ü2".encode()]
    assert values["flag"].tolist() == [True]
    assert values["n"].tolist() == [1, -2, 2**40]


def test_request_fields_travel() -> None:
    request, form = rest_codec.infer_request(
        "fraud",
        "2",
        body(
            [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            id="r-1",
            parameters={"priority": 2, "binary_data_output": True},
            outputs=[{"name": "p", "parameters": {"classification": 3}}, {"name": "q"}],
        ),
        None,
    )
    assert (request.model, request.version, request.id) == ("fraud", "2", "r-1")
    assert request.parameters["priority"] == 2
    assert request.outputs == ["p", "q"]
    assert request.classes == {"p": 3} and request.output_parameters
    assert form.wants_binary("q")


def test_binary_extension_inputs_follow_the_json_part() -> None:
    floats = np.array([1.5, -2.0], dtype="<f4").tobytes()
    strings = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    head = body(
        [
            {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": len(floats)}},
            # `data: null` beside binary data, as some clients write it, is no data
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [2],
                "data": None,
                "parameters": {"binary_data_size": len(strings)},
            },
            {"name": "j", "datatype": "INT32", "shape": [1], "data": [7]},
        ],
        outputs=[{"name": "y", "parameters": {"binary_data": True}}],
    )
    values = tensors(head + floats + strings, str(len(head)))
    assert values["x"].tolist() == [1.5, -2.0]
    assert values["s"].tolist() == [b"ab", b""]
    assert values["j"].tolist() == [7]
    _, form = rest_codec.infer_request("m", "", head + floats + strings, str(len(head)))
    assert form.wants_binary("y") and not form.wants_binary("z")


@pytest.mark.parametrize(
    ("raw_body", "header_length", "names"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty list"),
        (body([{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]), None, "input 'x': unknown datatype"),
        (body([{"name": "x", "datatype": [0], "shape": [1], "data": [1]}]), None, "input 'x': unknown datatype"),
        (body([{"name": "x", "datatype": "FP32", "shape": [1.5], "data": [1]}]), None, "input 'x': 'shape'"),
        (body([{"name": "x", "datatype": "FP32", "shape": [2**62, 2**62, 0], "data": []}]), None, "input 'x'"),
        (body([{"name": "x", "datatype": "FP32", "shape": [1] * 9, "data": [1]}]), None, "input 'x': rank 9"),
        (body([{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]), None, "input 'x': 'data' does not"),
        (body([{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]), None, "input 'x': a value is out"),
        (body([{"name": "x", "datatype": "FP16", "shape": [1], "data": [1e10]}]), None, "input 'x': a value is out"),
        (body([{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]), None, "input 'x': 'data' does not"),
        (body([{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]), None, "input 'x': 'data' is"),
        (body([{"name": "x", "datatype": "BF16", "shape": [1], "data": [1]}]), None, "input 'x': BF16"),
        (body([{"name": "s", "datatype": "BYTES", "shape": [1], "data": [1]}]), None, "input 's': BYTES data must"),
        (body([{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["a", "b"]}]), None, "input 's': 'data' holds"),
        (
            body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}}]),
            None,
            "input 'x': binary_data_size 8 runs past",
        ),
        (
            body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}}]),
            None,
            "input 'x': has both 'data' and binary_data_size",
        ),
        (b'{"inputs": [{"name": "x"}]}', "5000", "Inference-Header-Content-Length 5000"),
        (b'{"inputs": [{"name": "x"}]}', "ten", "Inference-Header-Content-Length is not a number"),
        (
            body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], parameters={"p": [1]}),
            None,
            "request: parameter 'p'",
        ),
        (body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], outputs=[{}]), None, "output 0"),
        (
            body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], parameters={"priority": 2**64}),
            None,
            "request: parameter 'priority' is out of the 64-bit integer range",
        ),
    ],
)
def test_malformed_requests_are_invalid_input_naming_the_problem(
    raw_body: bytes, header_length: str | None, names: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        rest_codec.infer_request("m", "", raw_body, header_length)
    assert names in str(refused.value)


def test_bytes_left_after_the_inputs_are_refused() -> None:
    head = body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}])
    with pytest.raises(InvalidInput, match="belong to no input"):
        rest_codec.infer_request("m", "", head + bytes(12), str(len(head)))


def test_bytes_data_is_walked_no_further_than_its_shape() -> None:
    """A BYTES list nested as deep as it likes, or longer than its shape, stops the walk at the bound."""
    deep: list[Any] = ["x"]
    for _ in range(12):
        deep = [deep]
    with pytest.raises(InvalidInput, match="nested deeper than 8"):
        rest_codec.infer_request("m", "", body([{"name": "s", "datatype": "BYTES", "shape": [1], "data": deep}]), None)
    with pytest.raises(InvalidInput, match="more than the 2 elements"):
        long = {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a"] * 100_000}
        rest_codec.infer_request("m", "", body([long]), None)


def response() -> InferResponse:
    return InferResponse(
        model="m",
        version="1",
        id="r-1",
        parameters={"infermesh_defaults": "1"},
        outputs=[
            Tensor("p", "FP32", (2, 1), np.array([[0.25], [0.5]], dtype="<f4")),
            Tensor("s", "BYTES", (2,), np.array([b"a", b"\xff"], dtype=object)),
            Tensor("h", "BF16", (1,), np.array([0x3FC0], dtype="<u2")),  # 1.5
        ],
    )


def test_json_answer() -> None:
    content, json_length = rest_codec.infer_response(response(), rest_codec.OutputForm())
    assert json_length is None
    document = json.loads(content)
    assert document["model_name"] == "m" and document["model_version"] == "1" and document["id"] == "r-1"
    assert document["parameters"] == {"infermesh_defaults": "1"}
    p, s, h = document["outputs"]
    assert p == {"name": "p", "datatype": "FP32", "shape": [2, 1], "data": [0.25, 0.5]}
    assert s["data"] == ["a", "\ufffd"]  # BYTES as text; bytes that are not UTF-8 replaced, not an error
    assert h["data"] == [1.5]


def test_binary_answer_for_the_outputs_asked() -> None:
    content, json_length = rest_codec.infer_response(response(), rest_codec.OutputForm(binary=frozenset({"p"})))
    assert json_length is not None
    document = json.loads(content[:json_length])
    p, s, _ = document["outputs"]
    assert p["parameters"] == {"binary_data_size": 8} and "data" not in p
    assert np.frombuffer(content[json_length:], dtype="<f4").tolist() == [0.25, 0.5]
    assert s["data"] == ["a", "\ufffd"]


def test_metadata_documents() -> None:
    from infermesh.dataplane import ModelInfo, ServerInfo
    from infermesh.model_config import TensorSpec

    assert rest_codec.server_metadata(ServerInfo("infermesh", "0.1", ("classification",))) == {
        "name": "infermesh",
        "version": "0.1",
        "extensions": ["classification"],
    }
    info = ModelInfo("m", ["1"], "pytorch", [TensorSpec(name="x", datatype="FP32", shape=[-1, 3])], [])
    assert rest_codec.model_metadata(info)["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
