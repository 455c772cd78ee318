import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCostRequest(_message.Message):
    __slots__ = ("by", "since_seconds")
    BY_FIELD_NUMBER: _ClassVar[int]
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    by: str
    since_seconds: float
    def __init__(self, by: _Optional[str] = ..., since_seconds: _Optional[float] = ...) -> None: ...

class CostLine(_message.Message):
    __slots__ = ("key", "dollars", "idle_warm_dollars", "idle_replica_dollars", "slice_seconds", "gpu_seconds", "dollars_per_hour", "tokens", "dollars_per_1k_tokens")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    IDLE_WARM_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    IDLE_REPLICA_DOLLARS_FIELD_NUMBER: _ClassVar[int]
    SLICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    key: str
    dollars: float
    idle_warm_dollars: float
    idle_replica_dollars: float
    slice_seconds: float
    gpu_seconds: float
    dollars_per_hour: float
    tokens: float
    dollars_per_1k_tokens: float
    def __init__(self, key: _Optional[str] = ..., dollars: _Optional[float] = ..., idle_warm_dollars: _Optional[float] = ..., idle_replica_dollars: _Optional[float] = ..., slice_seconds: _Optional[float] = ..., gpu_seconds: _Optional[float] = ..., dollars_per_hour: _Optional[float] = ..., tokens: _Optional[float] = ..., dollars_per_1k_tokens: _Optional[float] = ...) -> None: ...

class GetCostResponse(_message.Message):
    __slots__ = ("by", "since", "until", "lines", "total", "interval_seconds")
    BY_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    by: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    lines: _containers.RepeatedCompositeFieldContainer[CostLine]
    total: CostLine
    interval_seconds: float
    def __init__(self, by: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lines: _Optional[_Iterable[_Union[CostLine, _Mapping]]] = ..., total: _Optional[_Union[CostLine, _Mapping]] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class ModelCost(_message.Message):
    __slots__ = ("model", "dollars_per_hour", "dollars_24h", "dollars_per_1k_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_24H_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_PER_1K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    dollars_per_hour: float
    dollars_24h: float
    dollars_per_1k_tokens: float
    def __init__(self, model: _Optional[str] = ..., dollars_per_hour: _Optional[float] = ..., dollars_24h: _Optional[float] = ..., dollars_per_1k_tokens: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("apply", "limit", "kinds", "slice_id", "ids")
    APPLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    apply: bool
    limit: int
    kinds: _containers.RepeatedScalarFieldContainer[str]
    slice_id: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, apply: _Optional[bool] = ..., limit: _Optional[int] = ..., kinds: _Optional[_Iterable[str]] = ..., slice_id: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("kind", "deployment", "replica", "slice_id", "node", "action", "target", "saving_per_day", "risk", "result", "id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SAVING_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    deployment: str
    replica: str
    slice_id: str
    node: str
    action: str
    target: str
    saving_per_day: float
    risk: str
    result: str
    id: str
    def __init__(self, kind: _Optional[str] = ..., deployment: _Optional[str] = ..., replica: _Optional[str] = ..., slice_id: _Optional[str] = ..., node: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., saving_per_day: _Optional[float] = ..., risk: _Optional[str] = ..., result: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("recommendations", "saving_per_day", "applied", "stopped")
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    SAVING_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    recommendations: _containers.RepeatedCompositeFieldContainer[Recommendation]
    saving_per_day: float
    applied: int
    stopped: bool
    def __init__(self, recommendations: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., saving_per_day: _Optional[float] = ..., applied: _Optional[int] = ..., stopped: _Optional[bool] = ...) -> None: ...
