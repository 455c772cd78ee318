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

class ListInteractionsRequest(_message.Message):
    __slots__ = ("app_type", "workload_id", "tenant", "limit", "max_samples")
    APP_TYPE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    app_type: str
    workload_id: str
    tenant: str
    limit: int
    max_samples: int
    def __init__(self, app_type: _Optional[str] = ..., workload_id: _Optional[str] = ..., tenant: _Optional[str] = ..., limit: _Optional[int] = ..., max_samples: _Optional[int] = ...) -> None: ...

class HardwareFingerprint(_message.Message):
    __slots__ = ("gpu_model", "gpu_product", "gpu_memory_bytes", "driver_version", "cuda_version", "gpu_backend", "isolation", "mig_profile", "mps_share", "slice_memory_bytes", "compute_share", "node", "gpu_index")
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_PRODUCT_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    MPS_SHARE_FIELD_NUMBER: _ClassVar[int]
    SLICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    gpu_model: str
    gpu_product: str
    gpu_memory_bytes: int
    driver_version: str
    cuda_version: str
    gpu_backend: str
    isolation: str
    mig_profile: str
    mps_share: float
    slice_memory_bytes: int
    compute_share: float
    node: str
    gpu_index: int
    def __init__(self, gpu_model: _Optional[str] = ..., gpu_product: _Optional[str] = ..., gpu_memory_bytes: _Optional[int] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., gpu_backend: _Optional[str] = ..., isolation: _Optional[str] = ..., mig_profile: _Optional[str] = ..., mps_share: _Optional[float] = ..., slice_memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., node: _Optional[str] = ..., gpu_index: _Optional[int] = ...) -> None: ...

class UsageSample(_message.Message):
    __slots__ = ("at", "utilization_pct", "memory_used_bytes")
    AT_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    utilization_pct: float
    memory_used_bytes: float
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., utilization_pct: _Optional[float] = ..., memory_used_bytes: _Optional[float] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("workload_id", "tenant", "app_type", "phase", "labels", "hardware", "slice_id", "state", "started", "ended", "usage")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    APP_TYPE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    tenant: str
    app_type: str
    phase: str
    labels: _containers.ScalarMap[str, str]
    hardware: HardwareFingerprint
    slice_id: str
    state: str
    started: _timestamp_pb2.Timestamp
    ended: _timestamp_pb2.Timestamp
    usage: _containers.RepeatedCompositeFieldContainer[UsageSample]
    def __init__(self, workload_id: _Optional[str] = ..., tenant: _Optional[str] = ..., app_type: _Optional[str] = ..., phase: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[HardwareFingerprint, _Mapping]] = ..., slice_id: _Optional[str] = ..., state: _Optional[str] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage: _Optional[_Iterable[_Union[UsageSample, _Mapping]]] = ...) -> None: ...

class ListInteractionsResponse(_message.Message):
    __slots__ = ("interactions",)
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...
