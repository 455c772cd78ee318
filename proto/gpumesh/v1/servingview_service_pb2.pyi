import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpumesh.v1 import cost_service_pb2 as _cost_service_pb2
from gpumesh.v1 import deployment_service_pb2 as _deployment_service_pb2
from gpumesh.v1 import model_service_pb2 as _model_service_pb2
from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchServingViewRequest(_message.Message):
    __slots__ = ("interval_ms", "heartbeat_ms")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    heartbeat_ms: int
    def __init__(self, interval_ms: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class ServingView(_message.Message):
    __slots__ = ("deployments", "models", "gpus", "at", "sequence", "model_costs", "replica_api_keys")
    class ReplicaApiKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_COSTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_API_KEYS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[_deployment_service_pb2.Deployment]
    models: _containers.RepeatedCompositeFieldContainer[_model_service_pb2.Model]
    gpus: _containers.RepeatedCompositeFieldContainer[_types_pb2.GpuStatus]
    at: _timestamp_pb2.Timestamp
    sequence: int
    model_costs: _containers.RepeatedCompositeFieldContainer[_cost_service_pb2.ModelCost]
    replica_api_keys: _containers.ScalarMap[str, str]
    def __init__(self, deployments: _Optional[_Iterable[_Union[_deployment_service_pb2.Deployment, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[_model_service_pb2.Model, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[_types_pb2.GpuStatus, _Mapping]]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ..., model_costs: _Optional[_Iterable[_Union[_cost_service_pb2.ModelCost, _Mapping]]] = ..., replica_api_keys: _Optional[_Mapping[str, str]] = ...) -> None: ...
