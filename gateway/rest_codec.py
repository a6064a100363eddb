"""The Open Inference Protocol's HTTP/REST form (KServe v2 REST, Triton's HTTP API) ↔ the dataplane's domain
types: JSON tensors, and Triton's binary tensor extension (a JSON header, then the tensors' raw bytes, as
`tritonclient.http` sends by default). No HTTP here (gateway/rest.py) and no protobuf.

A request becomes the same InferRequest a gRPC ModelInfer does, with its data as raw bytes: the gateway then
checks names, datatypes, shapes and element counts against the model's signature exactly as for gRPC. What
is checked here is only the JSON's own form, before any tensor is built: a shape's rank and size, and that
BYTES data holds no more elements than its shape (so a made-up shape cannot make the conversion large).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from infermesh.dataplane import InferRequest, InferResponse, ModelIndexEntry, ModelInfo, ParameterValue, ServerInfo
from infermesh.errors import InvalidInput
from infermesh.model_config import TensorSpec
from infermesh.tensors import (
    DATATYPES,
    MAX_INPUTS,
    MAX_RANK,
    NUMPY_DTYPE,
    Buffer,
    InputHeader,
    RawInputs,
    Tensor,
    check_shape,
    element_count,
    encode_bytes,
    to_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor extension: the JSON part's length
BINARY_SIZE = "binary_data_size"  # an input's or output's parameter: its bytes follow the JSON part
MAX_PARAMETERS = MAX_INPUTS
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

# JSON numbers of each datatype: numpy's kinds a JSON array of them parses to (bool only for BOOL).
_JSON_KINDS: dict[str, str] = {"BOOL": "b", "FP16": "biuf", "FP32": "biuf", "FP64": "biuf"}
_INTEGER_KINDS = "biu"


# Requests ---------------------------------------------------------------------------------------------


class TooLarge(InvalidInput):
    """A body, or its JSON part, over its limit (HTTP's 413)."""


@dataclass(frozen=True, slots=True)
class OutputForm:
    """How the client wants its outputs: as binary data after the JSON part (all, or those named), else JSON."""

    everything_binary: bool = False
    binary: frozenset[str] = frozenset()

    def wants_binary(self, name: str) -> bool:
        return self.everything_binary or name in self.binary


def infer_request(
    model: str, version: str, body: bytes | bytearray, header_length: str | None, max_json_bytes: int = 2**31
) -> tuple[InferRequest, OutputForm]:
    """An `infer` body → the domain request (its inputs raw, as every hop inside the mesh sends them), and the
    form its answer is wanted in. The JSON part is parsed only when it is at most `max_json_bytes`: parsing is
    the one cost that grows with it."""
    json_part, binary = _split(body, header_length)
    if len(json_part) > max_json_bytes:
        raise TooLarge(json_limit_message(len(json_part), max_json_bytes))
    document = json_object(json_part)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request: 'inputs' must be a non-empty list of tensors")
    if len(inputs) > MAX_INPUTS:
        raise InvalidInput(f"request has more than {MAX_INPUTS} inputs")
    headers: list[InputHeader] = []
    raw: list[Buffer] = []
    view = memoryview(binary)
    offset = 0
    for index, tensor in enumerate(inputs):
        header, size = _input_header(index, tensor)
        headers.append(header)
        if size is None:
            raw.append(_json_data(header, tensor.get("data")))
            continue
        if offset + size > len(view):
            raise InvalidInput(f"input '{header.name}': {BINARY_SIZE} {size} runs past the end of the body")
        raw.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise InvalidInput(f"request: {len(view) - offset} bytes after the JSON part belong to no input")
    outputs, classes, binary_names = _requested_outputs(document.get("outputs"))
    parameters = parameters_of(document.get("parameters"), "request")
    form = OutputForm(parameters.get("binary_data_output") is True, frozenset(binary_names))
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("request: 'id' must be a string")
    request = InferRequest(
        model=model,
        version=version,
        inputs=RawInputs(headers, raw),
        id=request_id,
        outputs=outputs,
        parameters=parameters,
        output_parameters=bool(classes),
        classes=classes,
    )
    return request, form


def json_limit_message(size: int, max_json_bytes: int) -> str:
    return (
        f"JSON of {size} bytes exceeds the {max_json_bytes} bytes limit on JSON: send large tensors as binary data "
        "(binary_data_size) or over gRPC"
    )


def _split(
    body: bytes | bytearray, header_length: str | None
) -> tuple[bytes | bytearray | memoryview, bytes | memoryview]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} is not a number") from None
    if not 0 < length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} {length} is outside the body's {len(body)} bytes")
    view = memoryview(body)
    return view[:length], view[length:]


def json_object(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        document = json.loads(bytes(data))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise InvalidInput("request: the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidInput("request: the body must be a JSON object")
    return document


def _input_header(index: int, tensor: Any) -> tuple[InputHeader, int | None]:
    """The input's name, datatype and checked shape, and its binary size when its data follows the JSON."""
    if not isinstance(tensor, dict):
        raise InvalidInput(f"input {index}: must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"input {index}: 'name' must be a non-empty string")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list is not even hashable
        raise InvalidInput(f"input '{name}': unknown datatype {str(datatype)[:32]!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
    dims = check_shape(name, shape)
    parameters = parameters_of(tensor.get("parameters"), f"input '{name}'")
    size = parameters.get(BINARY_SIZE)
    if size is None:
        return InputHeader(name, datatype, dims), None
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input '{name}': {BINARY_SIZE} must be a non-negative integer")
    if tensor.get("data") is not None:
        raise InvalidInput(f"input '{name}': has both 'data' and {BINARY_SIZE}")
    return InputHeader(name, datatype, dims), size


def _json_data(header: InputHeader, data: Any) -> bytes:
    """An input's JSON data (flat or nested row-major) → its raw bytes; the element count is the gateway's to
    check against the shape, as for any raw input."""
    name, datatype = header.name, header.datatype
    if not isinstance(data, list):
        raise InvalidInput(f"input '{name}': 'data' must be a list (or the tensor sent as binary data)")
    count = element_count(header.shape)
    if datatype == "BYTES":
        elements = []
        for element in _flat(name, data, count):
            if not isinstance(element, str):
                raise InvalidInput(f"input '{name}': BYTES data must be strings")
            elements.append(element.encode())
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
        return encode_bytes(array)
    if datatype == "BF16":
        raise InvalidInput(f"input '{name}': BF16 data travels only as binary data")
    if not data:
        return b""  # no elements: the gateway checks that the shape holds none
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting, or deeper than numpy goes
        raise InvalidInput(f"input '{name}': 'data' is not a regular array") from None
    if values.dtype.kind not in _JSON_KINDS.get(datatype, _INTEGER_KINDS) or values.ndim > MAX_RANK:
        raise InvalidInput(f"input '{name}': 'data' does not hold {datatype} values")
    try:
        with np.errstate(over="raise", invalid="raise"):
            typed = values.astype(NUMPY_DTYPE[datatype], casting="unsafe")
    except FloatingPointError:
        raise InvalidInput(f"input '{name}': a value is out of {datatype}'s range") from None
    if values.dtype.kind in "iu" and not np.array_equal(typed, values):  # integers that do not fit silently wrap
        raise InvalidInput(f"input '{name}': a value is out of {datatype}'s range")
    return to_raw(datatype, typed.reshape(-1))


def _flat(name: str, data: list[Any], count: int) -> Iterator[Any]:
    """The elements of a (possibly nested) list in row-major order, refused past `count` elements or past
    MAX_RANK levels of nesting: the walk is bounded by the declared shape, not by what the list claims."""
    stack: list[Iterator[Any]] = [iter(data)]
    seen = 0
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                if len(stack) >= MAX_RANK:
                    raise InvalidInput(f"input '{name}': 'data' is nested deeper than {MAX_RANK} levels")
                stack.append(iter(element))
                break
            seen += 1
            if seen > count:
                raise InvalidInput(f"input '{name}': 'data' holds more than the {count} elements its shape needs")
            yield element
        else:
            stack.pop()


def _requested_outputs(outputs: Any) -> tuple[list[str], dict[str, int], set[str]]:
    """Requested output names, those asked as classes (Triton's classification), those asked as binary data."""
    if outputs is None:
        return [], {}, set()
    if not isinstance(outputs, list) or len(outputs) > MAX_INPUTS:
        raise InvalidInput(f"request: 'outputs' must be a list of at most {MAX_INPUTS} outputs")
    names: list[str] = []
    classes: dict[str, int] = {}
    binary: set[str] = set()
    for index, output in enumerate(outputs):
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"requested output {index}: 'name' must be a non-empty string")
        names.append(name)
        parameters = parameters_of(output.get("parameters"), f"output '{name}'")
        if "classification" in parameters:
            count = parameters["classification"]
            classes[name] = count if type(count) is int else 0  # 0: refused by the classification check
        if parameters.get("binary_data") is True:
            binary.add(name)
    return names, classes, binary


def parameters_of(parameters: Any, where: str) -> dict[str, ParameterValue]:
    """A JSON parameters object: string keys, scalar values (as the protocol's InferParameter)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict) or len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(f"{where}: 'parameters' must be an object of at most {MAX_PARAMETERS} entries")
    for key, value in parameters.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidInput(f"{where}: parameter {key[:64]!r} must be a string, number or boolean")
        if type(value) is int and not _INT64_MIN <= value <= _UINT64_MAX:  # the protocol's int64 or uint64_param
            raise InvalidInput(f"{where}: parameter {key[:64]!r} is out of the 64-bit integer range")
    return parameters


# Responses --------------------------------------------------------------------------------------------


def infer_response(response: InferResponse, form: OutputForm) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when binary outputs follow it (else None)."""
    outputs: list[dict[str, Any]] = []
    tails: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if form.wants_binary(tensor.name):
            raw = to_raw(tensor.datatype, tensor.data)
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            tails.append(raw)
        else:
            entry["data"] = json_values(tensor)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = dict(response.parameters)
    head = json.dumps(document, separators=(",", ":")).encode()
    if not tails:
        return head, None
    return b"".join([head, *tails]), len(head)


def json_values(tensor: Tensor) -> list[Any]:
    """A tensor's elements, flat, as JSON values (BYTES as text; BF16 widened to float)."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in flat.tolist()]
    if tensor.datatype == "BF16":
        flat = (flat.astype("<u4") << 16).view("<f4")
    values: list[Any] = flat.tolist()
    return values


def repository_index(entries: Iterable[ModelIndexEntry]) -> list[dict[str, str]]:
    return [{"name": e.name, "version": e.version, "state": e.state, "reason": e.reason} for e in entries]


def server_metadata(info: ServerInfo) -> dict[str, Any]:
    return {"name": info.name, "version": info.version, "extensions": list(info.extensions)}


def _tensor_metadata(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def model_metadata(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "versions": list(info.versions),
        "platform": info.platform,
        "inputs": _tensor_metadata(info.inputs),
        "outputs": _tensor_metadata(info.outputs),
    }
