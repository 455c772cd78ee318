from gpumesh.v1 import mesh_service_pb2 as _mesh_service_pb2
from gpumesh.v1 import migration_service_pb2 as _migration_service_pb2
from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("node_name", "inventory", "agent_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    inventory: _types_pb2.NodeInventory
    agent_version: str
    def __init__(self, node_name: _Optional[str] = ..., inventory: _Optional[_Union[_types_pb2.NodeInventory, _Mapping]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node", "lease_ttl_seconds", "heartbeat_interval_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    lease_ttl_seconds: int
    heartbeat_interval_seconds: float
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., lease_ttl_seconds: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_name",)
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    def __init__(self, node_name: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_ttl_seconds",)
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_ttl_seconds: int
    def __init__(self, lease_ttl_seconds: _Optional[int] = ...) -> None: ...

class SyncHello(_message.Message):
    __slots__ = ("node_name",)
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    def __init__(self, node_name: _Optional[str] = ...) -> None: ...

class SliceStatus(_message.Message):
    __slots__ = ("slice_id", "state", "device_uuid", "env", "message", "gpu_instance_id", "compute_instance_id")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    state: _types_pb2.SliceState
    device_uuid: str
    env: _containers.ScalarMap[str, str]
    message: str
    gpu_instance_id: int
    compute_instance_id: int
    def __init__(self, slice_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.SliceState, str]] = ..., device_uuid: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., message: _Optional[str] = ..., gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ...) -> None: ...

class SliceStatusReport(_message.Message):
    __slots__ = ("full", "statuses", "released")
    FULL_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    full: bool
    statuses: _containers.RepeatedCompositeFieldContainer[SliceStatus]
    released: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, full: _Optional[bool] = ..., statuses: _Optional[_Iterable[_Union[SliceStatus, _Mapping]]] = ..., released: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkloadStatusReport(_message.Message):
    __slots__ = ("full", "workloads")
    FULL_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    full: bool
    workloads: _containers.RepeatedCompositeFieldContainer[_types_pb2.Workload]
    def __init__(self, full: _Optional[bool] = ..., workloads: _Optional[_Iterable[_Union[_types_pb2.Workload, _Mapping]]] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("request_id", "data", "eof", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    data: bytes
    eof: bool
    error: str
    def __init__(self, request_id: _Optional[str] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report", "telemetry", "event", "workloads", "log", "mesh_hello", "mesh_registered", "mesh_buffer_failed", "migration")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    MESH_HELLO_FIELD_NUMBER: _ClassVar[int]
    MESH_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    MESH_BUFFER_FAILED_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    hello: SyncHello
    report: SliceStatusReport
    telemetry: _types_pb2.NodeTelemetry
    event: _types_pb2.NodeEvent
    workloads: WorkloadStatusReport
    log: LogChunk
    mesh_hello: _mesh_service_pb2.MeshHello
    mesh_registered: _mesh_service_pb2.MeshRegistered
    mesh_buffer_failed: _mesh_service_pb2.MeshBufferFailed
    migration: _migration_service_pb2.MigrationReport
    def __init__(self, hello: _Optional[_Union[SyncHello, _Mapping]] = ..., report: _Optional[_Union[SliceStatusReport, _Mapping]] = ..., telemetry: _Optional[_Union[_types_pb2.NodeTelemetry, _Mapping]] = ..., event: _Optional[_Union[_types_pb2.NodeEvent, _Mapping]] = ..., workloads: _Optional[_Union[WorkloadStatusReport, _Mapping]] = ..., log: _Optional[_Union[LogChunk, _Mapping]] = ..., mesh_hello: _Optional[_Union[_mesh_service_pb2.MeshHello, _Mapping]] = ..., mesh_registered: _Optional[_Union[_mesh_service_pb2.MeshRegistered, _Mapping]] = ..., mesh_buffer_failed: _Optional[_Union[_mesh_service_pb2.MeshBufferFailed, _Mapping]] = ..., migration: _Optional[_Union[_migration_service_pb2.MigrationReport, _Mapping]] = ...) -> None: ...

class DesiredSlices(_message.Message):
    __slots__ = ("full", "upserts", "removals", "revision")
    FULL_FIELD_NUMBER: _ClassVar[int]
    UPSERTS_FIELD_NUMBER: _ClassVar[int]
    REMOVALS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    full: bool
    upserts: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    removals: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, full: _Optional[bool] = ..., upserts: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ..., removals: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class WorkloadCommand(_message.Message):
    __slots__ = ("full", "start", "stop", "forget")
    FULL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    full: bool
    start: _containers.RepeatedCompositeFieldContainer[_types_pb2.Workload]
    stop: _containers.RepeatedScalarFieldContainer[str]
    forget: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, full: _Optional[bool] = ..., start: _Optional[_Iterable[_Union[_types_pb2.Workload, _Mapping]]] = ..., stop: _Optional[_Iterable[str]] = ..., forget: _Optional[_Iterable[str]] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("request_id", "workload_id", "tail_lines", "follow", "cancel")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    workload_id: str
    tail_lines: int
    follow: bool
    cancel: bool
    def __init__(self, request_id: _Optional[str] = ..., workload_id: _Optional[str] = ..., tail_lines: _Optional[int] = ..., follow: _Optional[bool] = ..., cancel: _Optional[bool] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("desired", "workloads", "logs", "mesh_register", "mesh_deregister", "mesh_peer", "migration", "gpu_reset")
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    MESH_REGISTER_FIELD_NUMBER: _ClassVar[int]
    MESH_DEREGISTER_FIELD_NUMBER: _ClassVar[int]
    MESH_PEER_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    GPU_RESET_FIELD_NUMBER: _ClassVar[int]
    desired: DesiredSlices
    workloads: WorkloadCommand
    logs: LogRequest
    mesh_register: _mesh_service_pb2.MeshRegister
    mesh_deregister: _mesh_service_pb2.MeshDeregister
    mesh_peer: _mesh_service_pb2.MeshPeer
    migration: _migration_service_pb2.MigrationCommand
    gpu_reset: GpuReset
    def __init__(self, desired: _Optional[_Union[DesiredSlices, _Mapping]] = ..., workloads: _Optional[_Union[WorkloadCommand, _Mapping]] = ..., logs: _Optional[_Union[LogRequest, _Mapping]] = ..., mesh_register: _Optional[_Union[_mesh_service_pb2.MeshRegister, _Mapping]] = ..., mesh_deregister: _Optional[_Union[_mesh_service_pb2.MeshDeregister, _Mapping]] = ..., mesh_peer: _Optional[_Union[_mesh_service_pb2.MeshPeer, _Mapping]] = ..., migration: _Optional[_Union[_migration_service_pb2.MigrationCommand, _Mapping]] = ..., gpu_reset: _Optional[_Union[GpuReset, _Mapping]] = ...) -> None: ...

class GpuReset(_message.Message):
    __slots__ = ("gpu_index", "reason")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    reason: str
    def __init__(self, gpu_index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
