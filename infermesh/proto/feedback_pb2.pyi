from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Label(_message.Message):
    __slots__ = ("request_id", "label", "event_time_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: float
    event_time_ms: int
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[float] = ..., event_time_ms: _Optional[int] = ...) -> None: ...

class ReportLabelsRequest(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class LabelResult(_message.Message):
    __slots__ = ("code", "message", "model", "version")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    model: str
    version: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ReportLabelsResponse(_message.Message):
    __slots__ = ("joined", "results")
    JOINED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    joined: int
    results: _containers.RepeatedCompositeFieldContainer[LabelResult]
    def __init__(self, joined: _Optional[int] = ..., results: _Optional[_Iterable[_Union[LabelResult, _Mapping]]] = ...) -> None: ...
