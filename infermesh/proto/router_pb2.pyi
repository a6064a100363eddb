from infermesh.proto import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Segment(_message.Message):
    __slots__ = ("rows", "id", "parameters", "tenant")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _inference_pb2.InferParameter
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_inference_pb2.InferParameter, _Mapping]] = ...) -> None: ...
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    rows: int
    id: str
    parameters: _containers.MessageMap[str, _inference_pb2.InferParameter]
    tenant: str
    def __init__(self, rows: _Optional[int] = ..., id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, _inference_pb2.InferParameter]] = ..., tenant: _Optional[str] = ...) -> None: ...

class InferBatchRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "inputs", "raw_input_contents", "outputs", "segments")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RAW_INPUT_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    inputs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ModelInferRequest.InferInputTensor]
    raw_input_contents: _containers.RepeatedScalarFieldContainer[bytes]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_inference_pb2.ModelInferRequest.InferInputTensor, _Mapping]]] = ..., raw_input_contents: _Optional[_Iterable[bytes]] = ..., outputs: _Optional[_Iterable[str]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class SegmentResult(_message.Message):
    __slots__ = ("code", "message", "flags", "model_version")
    class FlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    flags: _containers.ScalarMap[str, str]
    model_version: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., flags: _Optional[_Mapping[str, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class InferBatchResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "outputs", "raw_output_contents", "segments")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    outputs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ModelInferResponse.InferOutputTensor]
    raw_output_contents: _containers.RepeatedScalarFieldContainer[bytes]
    segments: _containers.RepeatedCompositeFieldContainer[SegmentResult]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_inference_pb2.ModelInferResponse.InferOutputTensor, _Mapping]]] = ..., raw_output_contents: _Optional[_Iterable[bytes]] = ..., segments: _Optional[_Iterable[_Union[SegmentResult, _Mapping]]] = ...) -> None: ...
