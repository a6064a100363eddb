"""Checks a request's tensors against a model's declared signature; every error names the tensor.

Pure logic: used by the gateway (public signature), the router and the model service (served one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from infermesh.errors import InvalidInput
from infermesh.model_config import MAX_ENTITY_ID_BYTES, TensorSpec
from infermesh.tensors import InputHeader, Tensor, check_shape


def validate_headers(
    model: str,
    specs: Sequence[TensorSpec],
    max_batch_size: int,
    headers: Sequence[InputHeader],
    max_rows: int | None = None,
) -> int:
    """Check a request's inputs as declared (names, datatypes, rank, shape, batch size) against a model's
    signature before any of their data is decoded; returns the batch size (first dimension, shared by every
    input). The work is proportional to the signature, not to what the request claims. `max_rows` (default: the
    model's `max_batch_size`) is the most rows accepted where a hop may take more than one request's worth."""
    by_name: dict[str, InputHeader] = {}
    for header in headers:
        if header.name in by_name:
            raise InvalidInput(f"input '{header.name}' appears more than once")
        by_name[header.name] = header
        if len(by_name) > len(specs):
            break  # an unknown input is reported below; no need to look at the rest
    expected = {spec.name for spec in specs}
    unknown = [name for name in by_name if name not in expected]
    if unknown:
        raise InvalidInput(
            f"input '{unknown[0]}' is not an input of model '{model}' (expected {', '.join(sorted(expected))})"
        )
    batch: int | None = None
    batch_input = ""
    for spec in specs:
        declared = by_name.get(spec.name)
        if declared is None:
            raise InvalidInput(f"input '{spec.name}' is missing (model '{model}' needs it)")
        if declared.datatype != spec.datatype:
            raise InvalidInput(f"input '{spec.name}': datatype {declared.datatype} does not match {spec.datatype}")
        shape = check_shape(spec.name, declared.shape)
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidInput(f"input '{spec.name}': shape {list(shape)} does not match {spec.shape}")
        rows = shape[0] if shape else 1
        if batch is None:
            batch, batch_input = rows, spec.name
        elif rows != batch:
            raise InvalidInput(
                f"input '{spec.name}': batch size {rows} differs from input '{batch_input}' batch size {batch}"
            )
    if batch is None or batch == 0:
        raise InvalidInput(f"model '{model}': request has an empty batch")
    if batch > (max_batch_size if max_rows is None else max_rows):
        raise batch_too_large(model, batch_input, batch, max_batch_size)
    return batch


def batch_too_large(model: str, input_name: str, rows: int, max_batch_size: int) -> InvalidInput:
    return InvalidInput(
        f"input '{input_name}': batch size {rows} exceeds the max_batch_size {max_batch_size} of model '{model}'"
    )


def validate_inputs(model: str, specs: Sequence[TensorSpec], max_batch_size: int, tensors: Mapping[str, Tensor]) -> int:
    """`validate_headers` for decoded tensors."""
    return validate_headers(
        model, specs, max_batch_size, [InputHeader(name, t.datatype, t.shape) for name, t in tensors.items()]
    )


def entity_ids(tensor: Tensor) -> list[str]:
    """Decode a BYTES tensor of entity ids; each must be non-empty UTF-8 of bounded length."""
    ids: list[str] = []
    for index, raw in enumerate(tensor.data.reshape(-1)):
        if not raw:
            raise InvalidInput(f"input '{tensor.name}': element {index} is an empty entity id")
        if len(raw) > MAX_ENTITY_ID_BYTES:
            raise InvalidInput(f"input '{tensor.name}': element {index} is longer than {MAX_ENTITY_ID_BYTES} bytes")
        try:
            ids.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise InvalidInput(f"input '{tensor.name}': element {index} is not valid UTF-8") from error
    return ids


def require_finite(tensor: Tensor) -> None:
    data = tensor.data
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        index = int(np.flatnonzero(~np.isfinite(data.reshape(-1)))[0])
        value = data.reshape(-1)[index]
        kind = "NaN" if math.isnan(value) else "infinite"
        raise InvalidInput(f"input '{tensor.name}': element {index} is {kind}")
