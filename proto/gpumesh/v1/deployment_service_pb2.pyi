import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpumesh.v1 import scaling_pb2 as _scaling_pb2
from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_PENDING: _ClassVar[ReplicaState]
    REPLICA_STATE_STARTING: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]
    REPLICA_STATE_TERMINATING: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_PENDING: ReplicaState
REPLICA_STATE_STARTING: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_FAILED: ReplicaState
REPLICA_STATE_TERMINATING: ReplicaState

class BackendSettings(_message.Message):
    __slots__ = ("context", "concurrency", "gpu_layers", "device")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    context: int
    concurrency: int
    gpu_layers: int
    device: str
    def __init__(self, context: _Optional[int] = ..., concurrency: _Optional[int] = ..., gpu_layers: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "model", "variant", "replicas", "isolation", "backend", "labels", "tenant", "priority", "restart_stamp", "scaling", "pool")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RESTART_STAMP_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    variant: str
    replicas: int
    isolation: _types_pb2.Isolation
    backend: BackendSettings
    labels: _containers.ScalarMap[str, str]
    tenant: str
    priority: int
    restart_stamp: str
    scaling: _scaling_pb2.ScalingPolicy
    pool: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., variant: _Optional[str] = ..., replicas: _Optional[int] = ..., isolation: _Optional[_Union[_types_pb2.Isolation, str]] = ..., backend: _Optional[_Union[BackendSettings, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., tenant: _Optional[str] = ..., priority: _Optional[int] = ..., restart_stamp: _Optional[str] = ..., scaling: _Optional[_Union[_scaling_pb2.ScalingPolicy, _Mapping]] = ..., pool: _Optional[str] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "deployment", "state", "endpoint", "slice_id", "node", "gpu_uuid", "gpu_index", "gpu_model", "isolation", "profile", "memory_bytes", "workload_id", "restarts", "message", "created_at", "ready_at", "last_crash_at", "next_start_at", "allocation_id", "template", "load", "endpoint_certificate")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_CRASH_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    deployment: str
    state: ReplicaState
    endpoint: str
    slice_id: str
    node: str
    gpu_uuid: str
    gpu_index: int
    gpu_model: str
    isolation: _types_pb2.Isolation
    profile: str
    memory_bytes: int
    workload_id: str
    restarts: int
    message: str
    created_at: _timestamp_pb2.Timestamp
    ready_at: _timestamp_pb2.Timestamp
    last_crash_at: _timestamp_pb2.Timestamp
    next_start_at: _timestamp_pb2.Timestamp
    allocation_id: str
    template: str
    load: _types_pb2.BackendLoad
    endpoint_certificate: str
    def __init__(self, id: _Optional[str] = ..., deployment: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., endpoint: _Optional[str] = ..., slice_id: _Optional[str] = ..., node: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., gpu_index: _Optional[int] = ..., gpu_model: _Optional[str] = ..., isolation: _Optional[_Union[_types_pb2.Isolation, str]] = ..., profile: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., workload_id: _Optional[str] = ..., restarts: _Optional[int] = ..., message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_crash_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_start_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allocation_id: _Optional[str] = ..., template: _Optional[str] = ..., load: _Optional[_Union[_types_pb2.BackendLoad, _Mapping]] = ..., endpoint_certificate: _Optional[str] = ...) -> None: ...

class DeploymentCondition(_message.Message):
    __slots__ = ("type", "status", "reason", "message", "last_transition_at")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_AT_FIELD_NUMBER: _ClassVar[int]
    type: str
    status: bool
    reason: str
    message: str
    last_transition_at: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[str] = ..., status: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., last_transition_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("replicas", "ready_replicas", "conditions", "vram_bytes", "backend", "autoscaler")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALER_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    ready_replicas: int
    conditions: _containers.RepeatedCompositeFieldContainer[DeploymentCondition]
    vram_bytes: int
    backend: str
    autoscaler: _scaling_pb2.AutoscalerStatus
    def __init__(self, replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[DeploymentCondition, _Mapping]]] = ..., vram_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., autoscaler: _Optional[_Union[_scaling_pb2.AutoscalerStatus, _Mapping]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "status", "replicas", "created_at", "updated_at", "generation")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    status: DeploymentStatus
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    generation: int
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., status: _Optional[_Union[DeploymentStatus, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("tenant", "model", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class ScaleDeploymentRequest(_message.Message):
    __slots__ = ("name", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class UpdateDeploymentRequest(_message.Message):
    __slots__ = ("spec", "generation")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    generation: int
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetScalingRequest(_message.Message):
    __slots__ = ("name", "policy", "clear")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy: _scaling_pb2.ScalingPolicy
    clear: bool
    def __init__(self, name: _Optional[str] = ..., policy: _Optional[_Union[_scaling_pb2.ScalingPolicy, _Mapping]] = ..., clear: _Optional[bool] = ...) -> None: ...

class WakeDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WakeDeploymentResponse(_message.Message):
    __slots__ = ("woke", "replicas", "ready_replicas")
    WOKE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    woke: bool
    replicas: int
    ready_replicas: int
    def __init__(self, woke: _Optional[bool] = ..., replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ...) -> None: ...
