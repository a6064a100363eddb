"""Open Inference Protocol message builders shared by the servicers (gateway, router, model service)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from infermesh.model_config import ModelConfig, TensorSpec
from infermesh.proto import inference_pb2
from infermesh.tensors import Tensor, decode_raw, to_raw

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
