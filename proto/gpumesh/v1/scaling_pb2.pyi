import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScalingPolicy(_message.Message):
    __slots__ = ("min_replicas", "max_replicas", "metric", "target", "stable_window_seconds", "panic_window_seconds", "panic_threshold", "scale_up_delay_seconds", "scale_down_delay_seconds", "max_scale_up_rate", "scale_to_zero_after_seconds", "predictive", "lead_time_seconds", "forecast_quantile", "cost_ceiling_per_hour", "variants", "slo_ttft_ms", "sizing", "sizing_quantile", "nowcast", "catch_up")
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STABLE_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PANIC_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PANIC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCALE_UP_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCALE_DOWN_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCALE_UP_RATE_FIELD_NUMBER: _ClassVar[int]
    SCALE_TO_ZERO_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIVE_FIELD_NUMBER: _ClassVar[int]
    LEAD_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORECAST_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    COST_CEILING_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    SLO_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    SIZING_FIELD_NUMBER: _ClassVar[int]
    SIZING_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    NOWCAST_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    stable_window_seconds: float
    panic_window_seconds: float
    panic_threshold: float
    scale_up_delay_seconds: float
    scale_down_delay_seconds: float
    max_scale_up_rate: float
    scale_to_zero_after_seconds: float
    predictive: bool
    lead_time_seconds: float
    forecast_quantile: float
    cost_ceiling_per_hour: float
    variants: _containers.RepeatedScalarFieldContainer[str]
    slo_ttft_ms: float
    sizing: str
    sizing_quantile: float
    nowcast: bool
    catch_up: bool
    def __init__(self, min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., metric: _Optional[str] = ..., target: _Optional[float] = ..., stable_window_seconds: _Optional[float] = ..., panic_window_seconds: _Optional[float] = ..., panic_threshold: _Optional[float] = ..., scale_up_delay_seconds: _Optional[float] = ..., scale_down_delay_seconds: _Optional[float] = ..., max_scale_up_rate: _Optional[float] = ..., scale_to_zero_after_seconds: _Optional[float] = ..., predictive: _Optional[bool] = ..., lead_time_seconds: _Optional[float] = ..., forecast_quantile: _Optional[float] = ..., cost_ceiling_per_hour: _Optional[float] = ..., variants: _Optional[_Iterable[str]] = ..., slo_ttft_ms: _Optional[float] = ..., sizing: _Optional[str] = ..., sizing_quantile: _Optional[float] = ..., nowcast: _Optional[bool] = ..., catch_up: _Optional[bool] = ...) -> None: ...

class AutoscalerStatus(_message.Message):
    __slots__ = ("desired", "mode", "reason", "bound_by", "last_scale_at", "observed_at", "signals", "replica_cost_per_hour", "woken_at", "figures_model")
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BOUND_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_SCALE_AT_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_COST_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    WOKEN_AT_FIELD_NUMBER: _ClassVar[int]
    FIGURES_MODEL_FIELD_NUMBER: _ClassVar[int]
    desired: int
    mode: str
    reason: str
    bound_by: str
    last_scale_at: _timestamp_pb2.Timestamp
    observed_at: _timestamp_pb2.Timestamp
    signals: _containers.ScalarMap[str, float]
    replica_cost_per_hour: float
    woken_at: _timestamp_pb2.Timestamp
    figures_model: str
    def __init__(self, desired: _Optional[int] = ..., mode: _Optional[str] = ..., reason: _Optional[str] = ..., bound_by: _Optional[str] = ..., last_scale_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., observed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signals: _Optional[_Mapping[str, float]] = ..., replica_cost_per_hour: _Optional[float] = ..., woken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., figures_model: _Optional[str] = ...) -> None: ...
