"""Open Inference Protocol message builders shared by the servicers (gateway, router, model service)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from infermesh import errors, segments
from infermesh.model_config import ModelConfig, TensorSpec
from infermesh.proto import inference_pb2
from infermesh.segments import SEGMENTS, SegmentResult
from infermesh.tensors import NUMPY_DTYPE, Tensor, decode_raw, element_count, to_raw

SERVER_NAME = "infermesh"
EXTENSIONS = ["model_repository", "infermesh_features"]


def tensor_metadata(specs: Iterable[TensorSpec]) -> list[inference_pb2.ModelMetadataResponse.TensorMetadata]:
    return [
        inference_pb2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def model_metadata(
    name: str, versions: list[str], platform: str, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]
) -> inference_pb2.ModelMetadataResponse:
    return inference_pb2.ModelMetadataResponse(
        name=name,
        versions=versions,
        platform=platform,
        inputs=tensor_metadata(inputs),
        outputs=tensor_metadata(outputs),
    )


def model_config(config: ModelConfig) -> inference_pb2.ModelConfigResponse:
    """Triton's ModelConfig view of a model's public signature (dims exclude the batch dimension)."""

    def data_type(datatype: str) -> int:
        return inference_pb2.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")

    batching = config.dynamic_batching
    return inference_pb2.ModelConfigResponse(
        config=inference_pb2.ModelConfig(
            name=config.name,
            platform=config.platform,
            backend="pytorch",
            max_batch_size=config.max_batch_size,
            input=[
                inference_pb2.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[1:])
                for s in config.inputs
            ],
            output=[
                inference_pb2.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[1:])
                for s in config.outputs
            ],
            dynamic_batching=inference_pb2.ModelDynamicBatching(
                max_queue_delay_microseconds=batching.max_queue_delay_us
            )
            if batching.enabled
            else None,
        )
    )


def infer_response(
    model: str,
    version: str,
    request_id: str,
    outputs: Iterable[Tensor],
    parameters: Mapping[str, str] | None = None,
) -> inference_pb2.ModelInferResponse:
    """Outputs always travel raw (what tritonclient reads first)."""
    outputs = list(outputs)
    response = inference_pb2.ModelInferResponse(
        model_name=model,
        model_version=version,
        id=request_id,
        outputs=[
            inference_pb2.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in outputs
        ],
        raw_output_contents=[to_raw(t.datatype, t.data) for t in outputs],
    )
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    return response


def infer_request(model: str, version: str, inputs: Iterable[Tensor]) -> inference_pb2.ModelInferRequest:
    """A request between services: every input travels raw."""
    inputs = list(inputs)
    return inference_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[
            inference_pb2.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in inputs
        ],
        raw_input_contents=[to_raw(t.datatype, t.data) for t in inputs],
    )


def response_outputs(response: inference_pb2.ModelInferResponse) -> dict[str, Tensor]:
    """The raw outputs of a response (as infer_response writes them), by name."""
    outputs: dict[str, Tensor] = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(output.shape)
        outputs[output.name] = Tensor(
            output.name, output.datatype, shape, decode_raw(output.name, output.datatype, shape, raw)
        )
    return outputs


def requested_outputs(request: inference_pb2.ModelInferRequest) -> list[str]:
    return [output.name for output in request.outputs]


# Segmented ModelInfer between gateway and router (infermesh.segments) --------------------------------


def merge_requests(
    model: str,
    version: str,
    requests: Sequence[inference_pb2.ModelInferRequest],
    tensors: Sequence[Mapping[str, Tensor]],
    rows: Sequence[int],
) -> inference_pb2.ModelInferRequest:
    """One request carrying every request's rows in order. The requests were validated one by one (their
    decoded inputs are `tensors`) and have the same inputs (name, datatype, shape after the batch
    dimension) and requested outputs. Raw inputs are joined as they came; typed ones are encoded once."""
    first = requests[0]
    merged = inference_pb2.ModelInferRequest(model_name=model, model_version=version)
    merged.parameters[SEGMENTS].string_param = ",".join(str(r) for r in rows)
    for output in first.outputs:
        merged.outputs.add(name=output.name)
    raws = [_raw_inputs(request, decoded) for request, decoded in zip(requests, tensors, strict=True)]
    for spec in first.inputs:
        merged.inputs.add(name=spec.name, datatype=spec.datatype, shape=[sum(rows), *spec.shape[1:]])
        merged.raw_input_contents.append(b"".join(raw[spec.name] for raw in raws))
    return merged


def _raw_inputs(request: inference_pb2.ModelInferRequest, tensors: Mapping[str, Tensor]) -> Mapping[str, bytes]:
    if request.raw_input_contents:
        return {spec.name: raw for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
    return {name: to_raw(t.datatype, t.data) for name, t in tensors.items()}


def split_segmented_response(
    response: inference_pb2.ModelInferResponse, ids: Sequence[str]
) -> list[bytes | errors.DomainError]:
    """Per segment: the serialised response its client would have got alone, or its error."""
    if SEGMENTS not in response.parameters:
        raise errors.Unavailable("the router did not answer per segment")
    reports = segments.read_report(response.parameters[SEGMENTS].string_param, len(ids))
    outputs = [
        (spec, _row_slicer(spec.datatype, tuple(spec.shape), raw))
        for spec, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    ]
    answers: list[bytes | errors.DomainError] = []
    row = 0
    for request_id, report in zip(ids, reports, strict=True):
        error = segments.error_of(report)
        if error is not None:
            answers.append(error)
            continue
        rows = int(report["rows"])
        segment = inference_pb2.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        segment.id = request_id
        for spec, slicer in outputs:
            segment.outputs.add(name=spec.name, datatype=spec.datatype, shape=[rows, *spec.shape[1:]])
            segment.raw_output_contents.append(slicer(row, row + rows))
        for key, value in report.get("parameters", {}).items():
            segment.parameters[key].string_param = value
        answers.append(segment.SerializeToString())
        row += rows
    return answers


def _row_slicer(datatype: str, shape: tuple[int, ...], raw: bytes):
    """Rows [lo, hi) of a raw output, as raw bytes: a byte range for fixed-size types, re-encoded for BYTES."""
    if datatype == "BYTES":
        array = decode_raw("output", datatype, shape, raw).reshape(shape[0], -1) if shape else None
        return lambda lo, hi: to_raw(datatype, array[lo:hi]) if array is not None else b""
    row_bytes = element_count(shape[1:]) * NUMPY_DTYPE[datatype].itemsize
    view = memoryview(raw)
    return lambda lo, hi: bytes(view[lo * row_bytes : hi * row_bytes])


def segmented_response(
    model: str, version: str, output_names: Sequence[str], results: Sequence[SegmentResult]
) -> inference_pb2.ModelInferResponse:
    """One response for every segment: the successful ones' rows concatenated, a report per segment."""
    parts: dict[str, list[Tensor]] = {name: [] for name in output_names}
    for result in results:
        if result.error is None:
            for tensor in result.outputs:
                parts[tensor.name].append(tensor)
    response = inference_pb2.ModelInferResponse(model_name=model, model_version=version)
    for name, tensors in parts.items():
        if not tensors:
            continue
        data = tensors[0].data if len(tensors) == 1 else np.concatenate([t.data for t in tensors])
        first = tensors[0]
        response.outputs.add(name=name, datatype=first.datatype, shape=[len(data), *first.shape[1:]])
        response.raw_output_contents.append(to_raw(first.datatype, data))
    response.parameters[SEGMENTS].string_param = segments.report(results)
    return response
