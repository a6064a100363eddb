"""Open Inference Protocol message builders shared by the servicers (gateway, router, model service)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from infermesh.model_config import TensorSpec
from infermesh.proto import inference_pb2
from infermesh.tensors import Tensor, to_raw

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


def requested_outputs(request: inference_pb2.ModelInferRequest) -> list[str]:
    return [output.name for output in request.outputs]
