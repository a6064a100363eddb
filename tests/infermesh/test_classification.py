"""Triton's classification extension applied to an answer: the top k of each row as "<value>:<index>"."""

from __future__ import annotations

import numpy as np
import pytest

# tritonclient's stubs: the same wire format as the mesh's, which must not share the test process with them.
from tritonclient.grpc import service_pb2 as pb

from infermesh import classification
from infermesh.errors import InvalidInput
from infermesh.model_config import TensorSpec
from infermesh.tensors import decode_bytes, to_raw


def answer(name: str, datatype: str, values: np.ndarray) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
    response.outputs.add(name="other", datatype="FP32", shape=[1])
    response.raw_output_contents.extend([to_raw(datatype, values), np.float32(7).tobytes()])
    return response


def classes_of(response: pb.ModelInferResponse, index: int = 0) -> tuple[list[int], list[bytes]]:
    output = response.outputs[index]
    assert output.datatype == "BYTES"
    shape = list(output.shape)
    count = int(np.prod(shape))
    return shape, list(decode_bytes(output.name, response.raw_output_contents[index], count))


def test_each_row_gets_its_top_k_in_descending_order_and_other_outputs_are_untouched() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    data = answer("probs", "FP32", scores)
    classification.classify(data, {"probs": 2}, batched=True)
    shape, classes = classes_of(data)
    assert shape == [2, 2]
    assert classes == [b"0.700000:1", b"0.200000:2", b"0.500000:0", b"0.250000:1"]
    other = data
    assert other.outputs[1].datatype == "FP32" and other.raw_output_contents[1] == np.float32(7).tobytes()


def test_a_count_above_the_classes_there_are_gives_them_all_and_unbatched_models_rank_every_element() -> None:
    data = answer("logits", "INT32", np.array([3, 9, 1], np.int32))
    classification.classify(data, {"logits": 10}, False)
    assert classes_of(data) == ([3], [b"9:1", b"3:0", b"1:2"])


def test_labels_are_appended_where_an_index_has_one() -> None:
    scores = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    data = answer("p", "FP32", scores)
    classification.classify(data, {"p": 3}, True, {"p": ["cat", "dog"]})
    assert classes_of(data)[1] == [b"0.700000:1:dog", b"0.200000:2", b"0.100000:0:cat"]


def test_bf16_is_ranked_by_its_value_not_its_bits() -> None:
    bits = (np.array([[-2.0, 1.0, 0.5]], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    data = answer("p", "BF16", bits)
    classification.classify(data, {"p": 1}, batched=True)
    assert classes_of(data) == ([1, 1], [b"1.000000:1"])


@pytest.mark.parametrize("value", [0, -1])
def test_a_class_count_must_be_a_positive_integer(value: int) -> None:
    request = pb.ModelInferRequest()
    request.outputs.add(name="p").parameters[classification.PARAMETER].int64_param = value
    spec = [TensorSpec(name="p", datatype="FP32", shape=[-1])]
    with pytest.raises(InvalidInput, match="output 'p': classification must be a positive integer"):
        classification.check(classification.requested_classes(request.outputs), spec)
    request.outputs[0].parameters[classification.PARAMETER].string_param = "3"
    with pytest.raises(InvalidInput):
        classification.check(classification.requested_classes(request.outputs), spec)


def test_an_output_of_strings_cannot_be_classified() -> None:
    with pytest.raises(InvalidInput, match="output 'label': classification needs a numeric output, not BYTES"):
        classification.check({"label": 1}, [TensorSpec(name="label", datatype="BYTES", shape=[-1, 1])])
