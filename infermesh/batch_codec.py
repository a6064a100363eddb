"""`infermesh.router.v1` messages ↔ the batch types of infermesh.segments: the gateway writes a batch and reads
the router's answer per segment; the router reads the batch and writes its answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from infermesh import errors
from infermesh.errors import Code
from infermesh.oip import parameters_of, set_parameters
from infermesh.proto import inference_pb2 as oip_pb
from infermesh.proto import router_pb2 as pb
from infermesh.segments import MAX_SEGMENTS, BatchResult, InferBatch, Segment
from infermesh.tensors import (
    MAX_INPUTS,
    NUMPY_DTYPE,
    MessageInputs,
    RawInputs,
    Tensor,
    decode_raw,
    element_count,
    to_raw,
)

# Gateway side -----------------------------------------------------------------------------------------


def batch_request(batch: InferBatch) -> pb.InferBatchRequest:
    request = pb.InferBatchRequest(model_name=batch.model, model_version=batch.version, outputs=batch.outputs)
    for header in batch.inputs.headers:
        request.inputs.add(name=header.name, datatype=header.datatype, shape=header.shape)
    request.raw_input_contents.extend(bytes(raw) for raw in batch.inputs.raw())  # views become bytes here
    for segment in batch.segments:
        message = request.segments.add(rows=segment.rows, id=segment.id, tenant=segment.tenant)
        if segment.parameters:
            set_parameters(message.parameters, segment.parameters)
    return request


def split_batch_response(
    response: pb.InferBatchResponse, segments: Sequence[Segment]
) -> list[bytes | errors.DomainError]:
    """Per segment: the serialised ModelInferResponse its client would have got alone, or its error."""
    if len(response.segments) != len(segments):
        raise errors.Unavailable("the router's answer per segment is malformed")
    outputs = [
        (spec, _row_slicer(spec.datatype, tuple(spec.shape), raw))
        for spec, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    ]
    answers: list[bytes | errors.DomainError] = []
    row = 0
    for segment, result in zip(segments, response.segments, strict=True):
        if result.code != Code.OK:
            answers.append(errors.error_for(result.code, result.message))
            continue
        rows = segment.rows
        answer = oip_pb.ModelInferResponse(
            model_name=response.model_name, model_version=result.model_version or response.model_version
        )
        answer.id = segment.id
        for spec, slicer in outputs:
            answer.outputs.add(name=spec.name, datatype=spec.datatype, shape=[rows, *spec.shape[1:]])
            answer.raw_output_contents.append(slicer(row, row + rows))
        for key, value in result.flags.items():
            answer.parameters[key].string_param = value
        answers.append(answer.SerializeToString())
        row += rows
    return answers


def _row_slicer(datatype: str, shape: tuple[int, ...], raw: bytes) -> Callable[[int, int], bytes]:
    """Rows [lo, hi) of a raw output, as raw bytes: a byte range for fixed-size types, re-encoded for BYTES."""
    if datatype == "BYTES":
        array = decode_raw("output", datatype, shape, raw).reshape(shape[0], -1) if shape else None
        return lambda lo, hi: to_raw(datatype, array[lo:hi]) if array is not None else b""
    row_bytes = element_count(shape[1:]) * NUMPY_DTYPE[datatype].itemsize
    view = memoryview(raw)
    return lambda lo, hi: bytes(view[lo * row_bytes : hi * row_bytes])


# Router side ------------------------------------------------------------------------------------------


def infer_batch(request: pb.InferBatchRequest) -> InferBatch:
    """The batch a gateway sent; its data is decoded (and checked) only when the router asks for it."""
    if len(request.segments) > MAX_SEGMENTS:
        raise errors.InvalidInput(f"a batch needs 1 to {MAX_SEGMENTS} segments, got {len(request.segments)}")
    if len(request.outputs) > MAX_INPUTS:
        raise errors.InvalidInput(f"a batch asks for {len(request.outputs)} outputs, more than {MAX_INPUTS}")
    headers = MessageInputs(request).headers
    segments = [
        Segment(s.rows, s.id, parameters_of(s.parameters) if s.parameters else {}, s.tenant) for s in request.segments
    ]
    return InferBatch(
        request.model_name,
        request.model_version,
        RawInputs(headers, request.raw_input_contents),
        list(request.outputs),
        segments,
    )


def batch_response(result: BatchResult) -> pb.InferBatchResponse:
    """The successful segments' rows concatenated, a status and flags per segment."""
    parts: dict[str, list[Tensor]] = {name: [] for name in result.output_names}
    response = pb.InferBatchResponse(model_name=result.model, model_version=result.version)
    for segment in result.segments:
        if segment.error is None:
            for tensor in segment.outputs:
                parts[tensor.name].append(tensor)
            version = segment.version if segment.version != result.version else ""
            response.segments.add(code=Code.OK, flags=segment.flags, model_version=version)
        else:
            response.segments.add(code=segment.error.code, message=str(segment.error))
    for name, tensors in parts.items():
        if not tensors:
            continue
        data = tensors[0].data if len(tensors) == 1 else np.concatenate([t.data for t in tensors])
        first = tensors[0]
        response.outputs.add(name=name, datatype=first.datatype, shape=[len(data), *first.shape[1:]])
        response.raw_output_contents.append(to_raw(first.datatype, data))
    return response
