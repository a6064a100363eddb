from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotRequest(_message.Message):
    __slots__ = ("known_generation",)
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    known_generation: str
    def __init__(self, known_generation: _Optional[str] = ...) -> None: ...

class VersionState(_message.Message):
    __slots__ = ("version", "state", "reason", "profile_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    reason: str
    profile_json: str
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., profile_json: _Optional[str] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("name", "config_json", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_json: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionState]
    def __init__(self, name: _Optional[str] = ..., config_json: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionState, _Mapping]]] = ...) -> None: ...

class RepositorySnapshot(_message.Message):
    __slots__ = ("generation", "unchanged", "models")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    generation: str
    unchanged: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelState]
    def __init__(self, generation: _Optional[str] = ..., unchanged: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelState, _Mapping]]] = ...) -> None: ...
