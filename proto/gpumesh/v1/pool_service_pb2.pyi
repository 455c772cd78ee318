import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolSelector(_message.Message):
    __slots__ = ("gpu_models", "isolations", "node_labels")
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GPU_MODELS_FIELD_NUMBER: _ClassVar[int]
    ISOLATIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    gpu_models: _containers.RepeatedScalarFieldContainer[str]
    isolations: _containers.RepeatedScalarFieldContainer[_types_pb2.Isolation]
    node_labels: _containers.ScalarMap[str, str]
    def __init__(self, gpu_models: _Optional[_Iterable[str]] = ..., isolations: _Optional[_Iterable[_Union[_types_pb2.Isolation, str]]] = ..., node_labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PoolQuota(_message.Message):
    __slots__ = ("max_gpus", "max_slices", "max_memory_bytes", "max_dollars_per_hour")
    MAX_GPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DOLLARS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    max_gpus: float
    max_slices: int
    max_memory_bytes: int
    max_dollars_per_hour: float
    def __init__(self, max_gpus: _Optional[float] = ..., max_slices: _Optional[int] = ..., max_memory_bytes: _Optional[int] = ..., max_dollars_per_hour: _Optional[float] = ...) -> None: ...

class PoolUsage(_message.Message):
    __slots__ = ("slices", "gpus", "memory_bytes", "dollars_per_hour", "capacity_gpus", "capacity_memory_bytes", "available_slices", "available_gpus", "available_memory_bytes", "available_dollars_per_hour", "deployments")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_GPUS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_SLICES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_GPUS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_DOLLARS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    slices: int
    gpus: float
    memory_bytes: int
    dollars_per_hour: float
    capacity_gpus: int
    capacity_memory_bytes: int
    available_slices: int
    available_gpus: float
    available_memory_bytes: int
    available_dollars_per_hour: float
    deployments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slices: _Optional[int] = ..., gpus: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., dollars_per_hour: _Optional[float] = ..., capacity_gpus: _Optional[int] = ..., capacity_memory_bytes: _Optional[int] = ..., available_slices: _Optional[int] = ..., available_gpus: _Optional[float] = ..., available_memory_bytes: _Optional[int] = ..., available_dollars_per_hour: _Optional[float] = ..., deployments: _Optional[_Iterable[str]] = ...) -> None: ...

class Pool(_message.Message):
    __slots__ = ("name", "description", "selector", "quota", "usage", "created_at", "updated_at", "generation", "tenants")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    selector: PoolSelector
    quota: PoolQuota
    usage: PoolUsage
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    generation: int
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., selector: _Optional[_Union[PoolSelector, _Mapping]] = ..., quota: _Optional[_Union[PoolQuota, _Mapping]] = ..., usage: _Optional[_Union[PoolUsage, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation: _Optional[int] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class CreatePoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[Pool]
    def __init__(self, pools: _Optional[_Iterable[_Union[Pool, _Mapping]]] = ...) -> None: ...

class UpdatePoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: Pool
    def __init__(self, pool: _Optional[_Union[Pool, _Mapping]] = ...) -> None: ...

class DeletePoolRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
