"""Triton's classification extension: an output requested with the `classification` parameter (tritonclient's
`InferRequestedOutput(name, class_count=k)`) comes back as the k largest values of each batch row, as BYTES
strings "<value>:<index>" (":<label>" appended where the output has labels) in descending order, shape
[batch, k] (or [k] for a model without batching), instead of the values themselves. The gateway applies it to the
answer, so every model gets it and no hop below sees it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from infermesh.errors import InvalidInput
from infermesh.model_config import TensorSpec
from infermesh.tensors import decode_raw, encode_bytes

PARAMETER = "classification"
NOT_CLASSIFIABLE = ("BYTES", "BOOL")


def requested_classes(outputs: Iterable[Any]) -> dict[str, int]:
    """{output name: class count} of the requested outputs (InferRequestedOutputTensor) that ask for classes; a
    count that is no integer reads 0. Checked by `check`, with the request's model: on a stream, a bad count
    fails its own request, not the stream."""
    classes: dict[str, int] = {}
    for output in outputs:
        if PARAMETER not in output.parameters:
            continue
        parameter = output.parameters[PARAMETER]
        choice = parameter.WhichOneof("parameter_choice")
        classes[output.name] = getattr(parameter, choice) if choice in ("int64_param", "uint64_param") else 0
    return classes


def check(classes: Mapping[str, int], outputs: Iterable[TensorSpec]) -> None:
    """Before any work: each class count is a positive integer, and each output asked as classes holds numbers."""
    for name, count in classes.items():
        if count < 1:
            raise InvalidInput(f"output '{name}': classification must be a positive integer class count")
    for spec in outputs:
        if spec.name in classes and spec.datatype in NOT_CLASSIFIABLE:
            raise InvalidInput(f"output '{spec.name}': classification needs a numeric output, not {spec.datatype}")


def classify(
    response: Any, classes: Mapping[str, int], batched: bool, labels: Mapping[str, Sequence[str]] | None = None
) -> None:
    """Replace, in the ModelInferResponse `response`, each output named in `classes` by its classes; `labels`: an
    output's class labels by index, appended where there is one ("<value>:<index>:<label>"). The message is taken
    as it is, not imported here: the mesh's generated stubs and tritonclient's cannot share a process."""
    for index, output in enumerate(response.outputs):
        count = classes.get(output.name)
        if count is None:
            continue
        shape = tuple(output.shape)  # a numeric output: `check` refused the others before the request went on
        values = decode_raw(output.name, output.datatype, shape, response.raw_output_contents[index])
        rows = values.reshape(shape[0], -1) if batched and shape else values.reshape(1, -1)
        count = min(count, rows.shape[1])
        ordered = _ordered(rows, output.datatype)
        top = np.argsort(-ordered, axis=1, kind="stable")[:, :count]  # ties: the lower index first
        # Each value as Triton writes it (std::to_string: six decimals for floats, integers as they are).
        text = _float_text if output.datatype in ("FP16", "FP32", "FP64", "BF16") else str
        shown = ordered if output.datatype == "BF16" else rows
        names = (labels or {}).get(output.name, ())
        classes_of_rows = [
            (f"{text(shown[row, k])}:{k}:{names[k]}" if k < len(names) else f"{text(shown[row, k])}:{k}").encode()
            for row in range(rows.shape[0])
            for k in top[row]
        ]
        output.datatype = "BYTES"
        del output.shape[:]
        output.shape.extend([rows.shape[0], count] if batched and shape else [count])
        response.raw_output_contents[index] = encode_bytes(np.array(classes_of_rows, dtype=object))


def _ordered(rows: np.ndarray, datatype: str) -> np.ndarray:
    """Values that sort as the output's do (BF16 travels as its 16 raw bits)."""
    if datatype == "BF16":
        return (rows.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return rows.astype(np.float64)


def _float_text(value: Any) -> str:
    return f"{float(value):f}"
