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

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: SyncHello
    report: SliceStatusReport
    def __init__(self, hello: _Optional[_Union[SyncHello, _Mapping]] = ..., report: _Optional[_Union[SliceStatusReport, _Mapping]] = ...) -> None: ...

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

class ControllerMessage(_message.Message):
    __slots__ = ("desired",)
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    desired: DesiredSlices
    def __init__(self, desired: _Optional[_Union[DesiredSlices, _Mapping]] = ...) -> None: ...
