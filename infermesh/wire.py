"""Just enough of the protobuf wire format to keep a ModelInferRequest's raw contents apart from the rest,
without copying them: a large request is nearly all raw contents, and only the rest needs protobuf's parser.
Pure: no protobuf import (the field number is the Open Inference Protocol's)."""

from __future__ import annotations

from infermesh.errors import InvalidInput
from infermesh.tensors import MAX_INPUTS

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents (the OIP field number)
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5
# Top-level fields a ModelInferRequest may carry: its inputs, outputs, parameters and raw contents (each at
# most MAX_INPUTS) and a few scalars. Beyond that it is refused before anything else is looked at.
_MAX_TOP_LEVEL_FIELDS = 4 * MAX_INPUTS + 8


def split_raw_contents(encoded: bytes) -> tuple[bytes, list[memoryview]]:
    """(every top-level field but raw_input_contents, re-joined; views of each raw_input_contents)."""
    view = memoryview(encoded)
    size = len(view)
    head: list[memoryview] = []
    raw: list[memoryview] = []
    position = 0
    while position < size:
        if len(head) + len(raw) >= _MAX_TOP_LEVEL_FIELDS:
            raise InvalidInput(f"request has more than {MAX_INPUTS} inputs, outputs or parameters")
        start = position
        tag, position = _varint(view, position)
        wire_type = tag & 7
        if wire_type == _LENGTH_DELIMITED:
            length, position = _varint(view, position)
            end = position + length
            if end > size:
                raise InvalidInput("malformed request: the message could not be parsed")
            if tag >> 3 == RAW_INPUT_CONTENTS:
                raw.append(view[position:end])
                position = end
                continue
            position = end
        elif wire_type == _VARINT:
            _, position = _varint(view, position)
        elif wire_type in (_FIXED64, _FIXED32):
            position += 8 if wire_type == _FIXED64 else 4
            if position > size:
                raise InvalidInput("malformed request: the message could not be parsed")
        else:  # groups (deprecated) or garbage
            raise InvalidInput("malformed request: the message could not be parsed")
        head.append(view[start:position])
    return b"".join(head), raw


def _varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    size = len(view)
    while True:
        if position >= size or shift > 63:
            raise InvalidInput("malformed request: the message could not be parsed")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
