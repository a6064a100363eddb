"""Open Inference Protocol messages ↔ the dataplane's domain types (infermesh.dataplane). The one place where
the public protocol's protobuf is read and written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from infermesh import repository
from infermesh.classification import requested_classes
from infermesh.dataplane import (
    EncodedInferResponse,
    InferAnswer,
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelInfo,
    ParameterValue,
    ServerInfo,
    StreamError,
)
from infermesh.errors import InvalidInput, client_message
from infermesh.model_config import ModelConfig, TensorSpec, mesh_sections
from infermesh.proto import inference_pb2 as pb
from infermesh.statistics import BatchStatistics, Duration, ModelStatistics
from infermesh.tensors import MAX_INPUTS, MessageInputs, Tensor, decode_raw, to_raw
from infermesh.wire import split_raw_contents

# Requests ---------------------------------------------------------------------------------------------


# Below this a request is parsed whole (copying its small raw contents costs less than walking the wire format
# in Python: ~11 µs against ~24 µs for a one-row `fraud` request); above it the raw contents are kept apart.
WHOLE_PARSE_BYTES = 64 * 1024


def parse_infer_request(encoded: bytes) -> InferRequest:
    """A serialized ModelInferRequest → the domain request, without copying its raw contents.

    The raw contents (nearly all of a large request) are located in the received bytes and kept as views;
    only the rest, small, is parsed by protobuf. A malformed request thus costs the same small time whatever
    its size, and a valid one is copied once less."""
    if len(encoded) <= WHOLE_PARSE_BYTES:  # small: protobuf's C parser at once is faster than any walk
        head, raw = encoded, None
    else:
        head, kept_apart = split_raw_contents(encoded)
        raw = kept_apart
    try:
        message = pb.ModelInferRequest.FromString(head)
    except DecodeError:
        raise InvalidInput("malformed request: the message could not be parsed") from None
    return infer_request(message, encoded, raw)


def infer_request(
    message: pb.ModelInferRequest, encoded: bytes = b"", raw: Sequence[memoryview] | None = None
) -> InferRequest:
    """The domain request of a ModelInferRequest; its input data is decoded only when asked for. `raw`: its
    raw contents when they were kept apart from the message (`parse_infer_request`)."""
    if len(message.outputs) > MAX_INPUTS or len(message.parameters) > MAX_INPUTS:
        raise InvalidInput(f"request has more than {MAX_INPUTS} requested outputs or parameters")
    output_parameters = any(output.parameters for output in message.outputs)
    return InferRequest(
        model=message.model_name,
        version=message.model_version,
        inputs=MessageInputs(message, raw),
        id=message.id,
        outputs=[output.name for output in message.outputs],
        parameters=parameters_of(message.parameters) if message.parameters else {},
        output_parameters=output_parameters,
        classes=requested_classes(message.outputs) if output_parameters else {},
        encoded=encoded,
    )


def infer_request_message(model: str, version: str, inputs: Iterable[Tensor]) -> pb.ModelInferRequest:
    """A request between services: every input travels raw."""
    inputs = list(inputs)
    return pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
        raw_input_contents=[to_raw(t.datatype, t.data) for t in inputs],
    )


def parameters_of(parameters: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    values: dict[str, ParameterValue] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


INT64_MAX = 2**63 - 1


def set_parameters(target: MutableMapping[str, pb.InferParameter], values: Mapping[str, ParameterValue]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            if value > INT64_MAX:  # a client's uint64_param, passed on as it came (int64 cannot hold it)
                target[key].uint64_param = value
            else:
                target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = value


# Responses --------------------------------------------------------------------------------------------


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs always travel raw (what tritonclient reads first)."""
    message = pb.ModelInferResponse(
        model_name=response.model,
        model_version=response.version,
        id=response.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in response.outputs
        ],
        raw_output_contents=[to_raw(t.datatype, t.data) for t in response.outputs],
    )
    for key, value in response.parameters.items():
        message.parameters[key].string_param = value
    return message


def encode_answer(answer: InferAnswer) -> bytes:
    if isinstance(answer, EncodedInferResponse):
        return answer.data  # from the hop below, byte for byte
    return infer_response(answer).SerializeToString()


# The response parameter by which Triton's streams tell a client that an answer is its request's last one
# (streaming clients wait for it). Every answer here is its request's only one.
FINAL_RESPONSE = "triton_final_response"


def stream_response(answer: InferAnswer | StreamError) -> pb.ModelStreamInferResponse:
    """A stream carries a failed request's error in its message and stays open (Triton's semantics); the id
    lets a client match the error to its request (several may be in flight). Each answer is flagged final."""
    if isinstance(answer, StreamError):
        request = answer.request
        response = pb.ModelStreamInferResponse(
            error_message=f"{answer.error.code.name}: {client_message(answer.error)}",
            infer_response=pb.ModelInferResponse(model_name=request.model, id=request.id),
        )
    elif isinstance(answer, EncodedInferResponse):
        response = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse.FromString(answer.data))
    else:
        response = pb.ModelStreamInferResponse(infer_response=infer_response(answer))
    response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return response


def decoded_response(encoded: bytes) -> InferResponse:
    """A serialised ModelInferResponse (a hop's answer, byte for byte) → the domain response."""
    response = pb.ModelInferResponse.FromString(encoded)
    parameters = {key: str(value) for key, value in parameters_of(response.parameters).items()}
    outputs = list(response_outputs(response).values())
    return InferResponse(response.model_name, response.model_version, outputs, response.id, parameters)


def response_outputs(response: pb.ModelInferResponse) -> dict[str, Tensor]:
    """The raw outputs of a response (as infer_response writes them), by name."""
    outputs: dict[str, Tensor] = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(output.shape)
        outputs[output.name] = Tensor(
            output.name, output.datatype, shape, decode_raw(output.name, output.datatype, shape, raw)
        )
    return outputs


# Metadata ---------------------------------------------------------------------------------------------


def server_metadata(info: ServerInfo) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=info.name, version=info.version, extensions=info.extensions)


def _tensor_metadata(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def model_metadata(info: ModelInfo) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=info.name,
        versions=info.versions,
        platform=info.platform,
        inputs=_tensor_metadata(info.inputs),
        outputs=_tensor_metadata(info.outputs),
    )


def model_config(config: ModelConfig) -> pb.ModelConfigResponse:
    """Triton's ModelConfig view of a model's public signature (dims exclude the batch dimension), with the
    mesh's own sections as parameters."""

    def data_type(datatype: str) -> str:
        return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"  # the enum value's name

    batching = config.dynamic_batching
    policy = config.version_policy
    if policy.all is not None:
        version_policy = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    elif policy.specific is not None:
        version_policy = pb.ModelVersionPolicy(
            specific=pb.ModelVersionPolicy.Specific(versions=policy.specific.versions)
        )
    else:
        latest = policy.latest.num_versions if policy.latest is not None else 1
        version_policy = pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=latest))
    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=config.name,
            platform=config.platform,
            version_policy=version_policy,
            backend="pytorch",
            max_batch_size=config.max_batch_size,
            input=[
                pb.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[1:]) for s in config.inputs
            ],
            output=[
                pb.ModelOutput(
                    name=s.name,
                    data_type=data_type(s.datatype),
                    dims=s.shape[1:],
                    label_filename=s.label_filename or "",
                )
                for s in config.outputs
            ],
            dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=batching.max_queue_delay_us)
            if batching.enabled
            else None,
            parameters={key: pb.ModelParameter(string_value=value) for key, value in mesh_sections(config).items()},
        )
    )


def repository_index(entries: Iterable[ModelIndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in entries
        ]
    )


def load_config_of(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> str | None:
    """The `config` override of a RepositoryModelLoad, if any (infermesh.repository.load_config_of)."""
    values: dict[str, object] = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, kind) if kind is not None else None
    return repository.load_config_of(values)


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _from_duration(message: pb.StatisticDuration) -> Duration:
    return Duration(message.count, message.ns)


def model_statistics(entries: Iterable[ModelStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=e.name,
                version=e.version,
                last_inference=e.last_inference_ms,
                inference_count=e.inference_count,
                execution_count=e.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(e.success),
                    fail=_duration(e.fail),
                    queue=_duration(e.queue),
                    compute_input=_duration(e.compute_input),
                    compute_infer=_duration(e.compute_infer),
                    compute_output=_duration(e.compute_output),
                    cache_hit=pb.StatisticDuration(),
                    cache_miss=pb.StatisticDuration(),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(
                        batch_size=b.batch_size,
                        compute_input=_duration(b.compute_input),
                        compute_infer=_duration(b.compute_infer),
                        compute_output=_duration(b.compute_output),
                    )
                    for _, b in sorted(e.batches.items())
                ],
            )
            for e in entries
        ]
    )


def statistics_of(response: pb.ModelStatisticsResponse) -> list[ModelStatistics]:
    found = []
    for m in response.model_stats:
        stats = m.inference_stats
        found.append(
            ModelStatistics(
                m.name,
                m.version,
                m.last_inference,
                m.inference_count,
                m.execution_count,
                _from_duration(stats.success),
                _from_duration(stats.fail),
                _from_duration(stats.queue),
                _from_duration(stats.compute_input),
                _from_duration(stats.compute_infer),
                _from_duration(stats.compute_output),
                {
                    b.batch_size: BatchStatistics(
                        b.batch_size,
                        _from_duration(b.compute_input),
                        _from_duration(b.compute_infer),
                        _from_duration(b.compute_output),
                    )
                    for b in m.batch_stats
                },
            )
        )
    return found


# The HTTP/REST form of the messages Triton's HTTP API answers as JSON ------------------------------------

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def json_of(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP API writes it: proto field names, every field, 64-bit integers as numbers
    (protobuf's JSON mapping writes those as strings)."""
    document = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(document, message.DESCRIPTOR)


def _numbers(document: dict[str, Any], descriptor: Any) -> dict[str, Any]:  # a message Descriptor
    for field in descriptor.fields:
        value = document.get(field.name)
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _numbers(item, value_field.message_type)
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _numbers(item, field.message_type)
        elif field.type in _INT64_TYPES:
            document[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return document


def model_config_json(config: ModelConfig) -> dict[str, Any]:
    return json_of(model_config(config).config)


def model_statistics_json(entries: Iterable[ModelStatistics]) -> dict[str, Any]:
    return json_of(model_statistics(entries))
