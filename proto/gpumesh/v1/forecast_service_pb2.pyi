import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetForecastRequest(_message.Message):
    __slots__ = ("kind", "name", "metric", "horizon_seconds", "step_seconds", "level")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    HORIZON_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    metric: str
    horizon_seconds: float
    step_seconds: float
    level: float
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., metric: _Optional[str] = ..., horizon_seconds: _Optional[float] = ..., step_seconds: _Optional[float] = ..., level: _Optional[float] = ...) -> None: ...

class ForecastPoint(_message.Message):
    __slots__ = ("at", "value", "lo", "hi")
    AT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    value: float
    lo: float
    hi: float
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., value: _Optional[float] = ..., lo: _Optional[float] = ..., hi: _Optional[float] = ...) -> None: ...

class GetForecastResponse(_message.Message):
    __slots__ = ("kind", "name", "metric", "points", "model", "backtest_mase", "level", "step_seconds", "history_points", "history_span_seconds", "last_value", "last_at", "source")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKTEST_MASE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_POINTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SPAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_VALUE_FIELD_NUMBER: _ClassVar[int]
    LAST_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    metric: str
    points: _containers.RepeatedCompositeFieldContainer[ForecastPoint]
    model: str
    backtest_mase: float
    level: float
    step_seconds: float
    history_points: int
    history_span_seconds: float
    last_value: float
    last_at: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., metric: _Optional[str] = ..., points: _Optional[_Iterable[_Union[ForecastPoint, _Mapping]]] = ..., model: _Optional[str] = ..., backtest_mase: _Optional[float] = ..., level: _Optional[float] = ..., step_seconds: _Optional[float] = ..., history_points: _Optional[int] = ..., history_span_seconds: _Optional[float] = ..., last_value: _Optional[float] = ..., last_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class ListSeriesRequest(_message.Message):
    __slots__ = ("kind",)
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    def __init__(self, kind: _Optional[str] = ...) -> None: ...

class SeriesInfo(_message.Message):
    __slots__ = ("kind", "name", "metric", "tenant", "samples", "first", "last")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    metric: str
    tenant: str
    samples: int
    first: _timestamp_pb2.Timestamp
    last: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., metric: _Optional[str] = ..., tenant: _Optional[str] = ..., samples: _Optional[int] = ..., first: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSeriesResponse(_message.Message):
    __slots__ = ("series",)
    SERIES_FIELD_NUMBER: _ClassVar[int]
    series: _containers.RepeatedCompositeFieldContainer[SeriesInfo]
    def __init__(self, series: _Optional[_Iterable[_Union[SeriesInfo, _Mapping]]] = ...) -> None: ...
