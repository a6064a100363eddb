"""Open Inference Protocol tensors ↔ numpy. Pure logic over protobuf messages; no transport.

Raw contents are little-endian, row-major; BYTES raw elements are a 4-byte little-endian length followed
by the bytes. FP16/BF16 travel raw only. BF16 has no numpy type, so it is carried as uint16 bit patterns.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from infermesh.errors import InvalidInput

NUMPY_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "BYTES": np.dtype(object),
}
DATATYPES = frozenset(NUMPY_DTYPE)

CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")
Buffer = bytes | memoryview  # raw contents: bytes, or a view of the bytes a message arrived in
ElementLimits = Mapping[str, int]  # input name → the longest BYTES element it may hold
MAX_INPUTS = 1024  # inputs (or requested outputs) per request
MAX_RANK = 8  # dimensions per tensor (numpy allows 64; no model here needs more than a few)
MAX_ELEMENTS = 2**31 - 1  # elements per tensor: far above any message's worth, far below an overflow


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A declared shape as ints: rank, sign and element count bounded before anything is allocated for it."""
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input '{name}': rank {len(shape)} exceeds {MAX_RANK} dimensions")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input '{name}': shape {list(dims)} has a negative dimension")
    # Each dimension too (a zero elsewhere makes the count 0, yet numpy still refuses such a shape).
    if any(d > MAX_ELEMENTS for d in dims) or element_count(dims) > MAX_ELEMENTS:
        raise InvalidInput(f"input '{name}': shape {list(dims)} holds more than {MAX_ELEMENTS} elements")
    return dims


def decode_bytes(name: str, raw: Buffer, count: int, max_element_bytes: int | None = None) -> np.ndarray:
    """Parse length-prefixed BYTES elements; the buffer must hold exactly `count` elements.

    The work is bounded by `count` (from the already-checked shape), never by what the buffer claims: a buffer
    that is too short or too long for `count` elements (of at most `max_element_bytes` each) is refused before
    any element is copied, and parsing stops at the count-th element."""
    size = len(raw)
    if size < 4 * count:
        raise InvalidInput(f"input '{name}': raw content is {size} bytes, too short for {count} BYTES elements")
    if max_element_bytes is not None and size > count * (4 + max_element_bytes):
        raise InvalidInput(
            f"input '{name}': raw content is {size} bytes, more than {count} BYTES elements of at most "
            f"{max_element_bytes} bytes"
        )
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    for index in range(count):
        if offset + 4 > size:
            raise InvalidInput(f"input '{name}': truncated BYTES length prefix at offset {offset}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if max_element_bytes is not None and length > max_element_bytes:
            raise InvalidInput(f"input '{name}': BYTES element {index} is longer than {max_element_bytes} bytes")
        if offset + length > size:
            raise InvalidInput(f"input '{name}': BYTES element {index} overruns the raw content")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != size:
        raise InvalidInput(f"input '{name}': raw content holds more than the {count} BYTES elements its shape needs")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def encode_bytes(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def decode_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: Buffer, max_element_bytes: int | None = None
) -> np.ndarray:
    count = element_count(shape)
    if datatype == "BYTES":
        return decode_bytes(name, raw, count, max_element_bytes).reshape(shape)
    dtype = NUMPY_DTYPE[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{name}': raw content is {len(raw)} bytes, expected {expected} for {datatype} {list(shape)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: Any, max_element_bytes: int | None = None
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must be sent as raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input '{name}': {field} holds {len(values)} values, shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        if max_element_bytes is not None:
            for index, value in enumerate(values):
                if len(value) > max_element_bytes:
                    raise InvalidInput(
                        f"input '{name}': BYTES element {index} is longer than {max_element_bytes} bytes"
                    )
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = NUMPY_DTYPE[datatype]
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError as error:
        raise InvalidInput(f"input '{name}': a value does not fit {datatype}") from error


def _check_raw_count(raw_contents: Sequence[Buffer], inputs: int) -> None:
    if raw_contents and len(raw_contents) != inputs:
        raise InvalidInput(
            f"request has {len(raw_contents)} raw_input_contents for {inputs} inputs; "
            "send raw contents for every input or for none"
        )


def _checked_header(name: str, datatype: str, shape: Any, seen: Mapping[str, object]) -> tuple[int, ...]:
    if name in seen:
        raise InvalidInput(f"input '{name}' appears more than once")
    if datatype not in DATATYPES:
        raise InvalidInput(f"input '{name}': unknown datatype '{datatype}'")
    return check_shape(name, shape)


def decode_inputs(
    request: Any, max_element_bytes: ElementLimits | None = None, raw_contents: Sequence[Buffer] | None = None
) -> dict[str, Tensor]:
    """All inputs of a ModelInferRequest as numpy arrays; checks raw/typed consistency and sizes.
    `max_element_bytes`: the longest BYTES element each input may hold (by name). `raw_contents`: the raw
    contents when they were kept apart from the message (views of the bytes received: no copy)."""
    if raw_contents is None:
        raw_contents = request.raw_input_contents
    if raw_contents:
        for tensor in request.inputs:
            if tensor.HasField("contents") and _has_typed_values(tensor.contents):
                raise InvalidInput(f"input '{tensor.name}': data given both in contents and raw_input_contents")
        return _decode_raw_inputs(_headers_of(request.inputs), raw_contents, max_element_bytes)
    limits = max_element_bytes or {}
    tensors: dict[str, Tensor] = {}
    for tensor in request.inputs:
        name = tensor.name
        datatype = tensor.datatype
        shape = _checked_header(name, datatype, tensor.shape, tensors)
        tensors[name] = Tensor(
            name, datatype, shape, decode_contents(name, datatype, shape, tensor.contents, limits.get(name))
        )
    return tensors


def _decode_raw_inputs(
    headers: Sequence[InputHeader], raw_contents: Sequence[Buffer], max_element_bytes: ElementLimits | None
) -> dict[str, Tensor]:
    """Inputs sent raw, one buffer per header (how every hop inside the mesh sends them)."""
    _check_raw_count(raw_contents, len(headers))
    if len(raw_contents) != len(headers):
        raise InvalidInput("request has no raw contents for its inputs")
    limits = max_element_bytes or {}
    tensors: dict[str, Tensor] = {}
    for header, raw in zip(headers, raw_contents, strict=True):
        shape = _checked_header(header.name, header.datatype, header.shape, tensors)
        data = decode_raw(header.name, header.datatype, shape, raw, limits.get(header.name))
        tensors[header.name] = Tensor(header.name, header.datatype, shape, data)
    return tensors


def _has_typed_values(contents: Any) -> bool:
    return any(len(getattr(contents, field)) for field in set(CONTENTS_FIELD.values()))


def to_raw(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return encode_bytes(array)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPE[datatype]).tobytes()


# A request's inputs, as the dataplane sees them ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputHeader:
    """An input as declared (name, datatype, shape), before any of its data is decoded."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Inputs(Protocol):
    """A request's input tensors: headers at once, data decoded only when asked (so a hop can check who
    calls, and what, before paying for the data)."""

    @property
    def headers(self) -> Sequence[InputHeader]: ...

    def tensors(self, max_element_bytes: ElementLimits | None = None) -> dict[str, Tensor]:
        """Every input decoded (once) and checked against its header; InvalidInput names the tensor. Work is
        bounded by the headers' shapes (check them first) and BYTES elements by `max_element_bytes`."""
        ...

    def raw(self) -> list[Buffer]:
        """Every input's data as raw OIP bytes, in header order (as received where it came raw)."""
        ...


def _headers_of(inputs: Sequence[Any]) -> list[InputHeader]:
    """Headers of a message's input tensors; a message with more inputs than any model has is refused without
    looking at them one by one."""
    if len(inputs) > MAX_INPUTS:
        raise InvalidInput(f"request has {len(inputs)} inputs, more than {MAX_INPUTS}")
    return [InputHeader(t.name, t.datatype, tuple(t.shape)) for t in inputs]


class MessageInputs:
    """The inputs of a ModelInferRequest message (read through its fields: no protobuf import here)."""

    __slots__ = ("_headers", "_message", "_raw", "_tensors")

    def __init__(self, message: Any, raw: Sequence[Buffer] | None = None) -> None:
        self._message = message
        self._raw = raw  # raw_input_contents kept apart from the message (views, no copies); None: in it
        self._headers: list[InputHeader] | None = None
        self._tensors: dict[str, Tensor] | None = None

    @property
    def headers(self) -> list[InputHeader]:
        if self._headers is None:
            self._headers = _headers_of(self._message.inputs)
        return self._headers

    def tensors(self, max_element_bytes: ElementLimits | None = None) -> dict[str, Tensor]:
        if self._tensors is None:
            self._tensors = decode_inputs(self._message, max_element_bytes, self._raw)
        return self._tensors

    def raw(self) -> list[Buffer]:
        raw = self._raw if self._raw is not None else self._message.raw_input_contents
        if raw:
            return list(raw)
        return [to_raw(t.datatype, t.data) for t in self.tensors().values()]


class RawInputs:
    """Inputs whose data is raw bytes, one per header (how every hop inside the mesh sends them)."""

    __slots__ = ("_headers", "_raw", "_tensors")

    def __init__(self, headers: Sequence[InputHeader], raw: Sequence[Buffer]) -> None:
        self._headers = list(headers)
        self._raw = list(raw)
        self._tensors: dict[str, Tensor] | None = None

    @property
    def headers(self) -> list[InputHeader]:
        return self._headers

    def tensors(self, max_element_bytes: ElementLimits | None = None) -> dict[str, Tensor]:
        if self._tensors is None:
            self._tensors = _decode_raw_inputs(self._headers, self._raw, max_element_bytes)
        return self._tensors

    def raw(self) -> list[Buffer]:
        return self._raw


class DecodedInputs:
    """Inputs that are tensors already (built in-process)."""

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._tensors = dict(tensors)

    @property
    def headers(self) -> list[InputHeader]:
        return [InputHeader(t.name, t.datatype, t.shape) for t in self._tensors.values()]

    def tensors(self, max_element_bytes: ElementLimits | None = None) -> dict[str, Tensor]:
        return self._tensors

    def raw(self) -> list[Buffer]:
        return [to_raw(t.datatype, t.data) for t in self._tensors.values()]
