from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STATUS_UNSPECIFIED: _ClassVar[FeatureStatus]
    PRESENT: _ClassVar[FeatureStatus]
    NOT_FOUND: _ClassVar[FeatureStatus]
    STALE: _ClassVar[FeatureStatus]
FEATURE_STATUS_UNSPECIFIED: FeatureStatus
PRESENT: FeatureStatus
NOT_FOUND: FeatureStatus
STALE: FeatureStatus

class ReadFeaturesRequest(_message.Message):
    __slots__ = ("feature_view", "entity_ids", "feature_names")
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    ENTITY_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    feature_view: str
    entity_ids: _containers.RepeatedScalarFieldContainer[str]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, feature_view: _Optional[str] = ..., entity_ids: _Optional[_Iterable[str]] = ..., feature_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadFeaturesResponse(_message.Message):
    __slots__ = ("feature_view", "feature_names", "values", "statuses", "ages_ms")
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    AGES_MS_FIELD_NUMBER: _ClassVar[int]
    feature_view: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[float]
    statuses: _containers.RepeatedScalarFieldContainer[FeatureStatus]
    ages_ms: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, feature_view: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[float]] = ..., statuses: _Optional[_Iterable[_Union[FeatureStatus, str]]] = ..., ages_ms: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchReadFeaturesRequest(_message.Message):
    __slots__ = ("reads",)
    READS_FIELD_NUMBER: _ClassVar[int]
    reads: _containers.RepeatedCompositeFieldContainer[ReadFeaturesRequest]
    def __init__(self, reads: _Optional[_Iterable[_Union[ReadFeaturesRequest, _Mapping]]] = ...) -> None: ...

class BatchReadFeaturesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ReadFeaturesResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ReadFeaturesResponse, _Mapping]]] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("entity_id", "values", "event_time_ms")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    entity_id: str
    values: _containers.ScalarMap[str, float]
    event_time_ms: int
    def __init__(self, entity_id: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ..., event_time_ms: _Optional[int] = ...) -> None: ...

class WriteFeaturesRequest(_message.Message):
    __slots__ = ("feature_view", "rows")
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    feature_view: str
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    def __init__(self, feature_view: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ...) -> None: ...

class WriteFeaturesResponse(_message.Message):
    __slots__ = ("written", "skipped_older")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_OLDER_FIELD_NUMBER: _ClassVar[int]
    written: int
    skipped_older: int
    def __init__(self, written: _Optional[int] = ..., skipped_older: _Optional[int] = ...) -> None: ...

class FeatureSpec(_message.Message):
    __slots__ = ("name", "default_value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_value: float
    description: str
    def __init__(self, name: _Optional[str] = ..., default_value: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class FeatureView(_message.Message):
    __slots__ = ("name", "entity_key", "features", "max_age_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    entity_key: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    max_age_ms: int
    def __init__(self, name: _Optional[str] = ..., entity_key: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., max_age_ms: _Optional[int] = ...) -> None: ...

class ListFeatureViewsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFeatureViewsResponse(_message.Message):
    __slots__ = ("views",)
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[FeatureView]
    def __init__(self, views: _Optional[_Iterable[_Union[FeatureView, _Mapping]]] = ...) -> None: ...
