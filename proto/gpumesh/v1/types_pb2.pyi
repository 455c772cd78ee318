import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Isolation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ISOLATION_UNSPECIFIED: _ClassVar[Isolation]
    ISOLATION_MIG: _ClassVar[Isolation]
    ISOLATION_MPS: _ClassVar[Isolation]
    ISOLATION_TIMESHARE: _ClassVar[Isolation]
    ISOLATION_EXCLUSIVE: _ClassVar[Isolation]

class Topology(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOPOLOGY_ANY: _ClassVar[Topology]
    TOPOLOGY_SAME_NODE: _ClassVar[Topology]
    TOPOLOGY_SAME_NVLINK_DOMAIN: _ClassVar[Topology]

class SliceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLICE_STATE_UNSPECIFIED: _ClassVar[SliceState]
    SLICE_STATE_PENDING: _ClassVar[SliceState]
    SLICE_STATE_READY: _ClassVar[SliceState]
    SLICE_STATE_RELEASING: _ClassVar[SliceState]
    SLICE_STATE_FAILED: _ClassVar[SliceState]
    SLICE_STATE_UNKNOWN: _ClassVar[SliceState]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_NOT_READY: _ClassVar[NodeState]
ISOLATION_UNSPECIFIED: Isolation
ISOLATION_MIG: Isolation
ISOLATION_MPS: Isolation
ISOLATION_TIMESHARE: Isolation
ISOLATION_EXCLUSIVE: Isolation
TOPOLOGY_ANY: Topology
TOPOLOGY_SAME_NODE: Topology
TOPOLOGY_SAME_NVLINK_DOMAIN: Topology
SLICE_STATE_UNSPECIFIED: SliceState
SLICE_STATE_PENDING: SliceState
SLICE_STATE_READY: SliceState
SLICE_STATE_RELEASING: SliceState
SLICE_STATE_FAILED: SliceState
SLICE_STATE_UNKNOWN: SliceState
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_NOT_READY: NodeState

class Placement(_message.Message):
    __slots__ = ("start", "size")
    START_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start: int
    size: int
    def __init__(self, start: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SliceSpec(_message.Message):
    __slots__ = ("tenant", "memory_bytes", "compute_share", "isolation", "gpu_model", "mig_profile", "count", "topology", "priority", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    memory_bytes: int
    compute_share: float
    isolation: Isolation
    gpu_model: str
    mig_profile: str
    count: int
    topology: Topology
    priority: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., isolation: _Optional[_Union[Isolation, str]] = ..., gpu_model: _Optional[str] = ..., mig_profile: _Optional[str] = ..., count: _Optional[int] = ..., topology: _Optional[_Union[Topology, str]] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("id", "allocation_id", "tenant", "node", "gpu_uuid", "gpu_index", "gpu_model", "isolation", "profile", "placement", "memory_bytes", "compute_share", "state", "device_uuid", "env", "message", "priority", "labels", "created_at", "updated_at", "gpu_instance_id", "compute_instance_id")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    GPU_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    allocation_id: str
    tenant: str
    node: str
    gpu_uuid: str
    gpu_index: int
    gpu_model: str
    isolation: Isolation
    profile: str
    placement: Placement
    memory_bytes: int
    compute_share: float
    state: SliceState
    device_uuid: str
    env: _containers.ScalarMap[str, str]
    message: str
    priority: int
    labels: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    gpu_instance_id: int
    compute_instance_id: int
    def __init__(self, id: _Optional[str] = ..., allocation_id: _Optional[str] = ..., tenant: _Optional[str] = ..., node: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., gpu_index: _Optional[int] = ..., gpu_model: _Optional[str] = ..., isolation: _Optional[_Union[Isolation, str]] = ..., profile: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., state: _Optional[_Union[SliceState, str]] = ..., device_uuid: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., message: _Optional[str] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "model", "product_name", "memory_bytes", "mig_enabled", "mig_pending", "nvlink_domain", "pci_bus_id", "serial")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MIG_PENDING_FIELD_NUMBER: _ClassVar[int]
    NVLINK_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    model: str
    product_name: str
    memory_bytes: int
    mig_enabled: bool
    mig_pending: bool
    nvlink_domain: int
    pci_bus_id: str
    serial: str
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., product_name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., mig_enabled: _Optional[bool] = ..., mig_pending: _Optional[bool] = ..., nvlink_domain: _Optional[int] = ..., pci_bus_id: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...

class Nic(_message.Message):
    __slots__ = ("name", "kind", "rate_gbps", "port_guid", "gpus")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RATE_GBPS_FIELD_NUMBER: _ClassVar[int]
    PORT_GUID_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    rate_gbps: int
    port_guid: str
    gpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., rate_gbps: _Optional[int] = ..., port_guid: _Optional[str] = ..., gpus: _Optional[_Iterable[int]] = ...) -> None: ...

class NvlinkDomain(_message.Message):
    __slots__ = ("gpus",)
    GPUS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gpus: _Optional[_Iterable[int]] = ...) -> None: ...

class NodeInventory(_message.Message):
    __slots__ = ("hostname", "gpus", "nvlink_domains", "nics", "driver_version", "cuda_version", "gpu_backend", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_DOMAINS_FIELD_NUMBER: _ClassVar[int]
    NICS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    nvlink_domains: _containers.RepeatedCompositeFieldContainer[NvlinkDomain]
    nics: _containers.RepeatedCompositeFieldContainer[Nic]
    driver_version: str
    cuda_version: str
    gpu_backend: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, hostname: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., nvlink_domains: _Optional[_Iterable[_Union[NvlinkDomain, _Mapping]]] = ..., nics: _Optional[_Iterable[_Union[Nic, _Mapping]]] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., gpu_backend: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "state", "cordoned", "inventory", "slices", "ready_slices", "registered_at", "last_heartbeat", "agent_version", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CORDONED_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    READY_SLICES_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: NodeState
    cordoned: bool
    inventory: NodeInventory
    slices: int
    ready_slices: int
    registered_at: _timestamp_pb2.Timestamp
    last_heartbeat: _timestamp_pb2.Timestamp
    agent_version: str
    message: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., cordoned: _Optional[bool] = ..., inventory: _Optional[_Union[NodeInventory, _Mapping]] = ..., slices: _Optional[int] = ..., ready_slices: _Optional[int] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., agent_version: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("node", "gpu", "allocated_memory_bytes", "allocated_compute_share", "slices", "mig_layout", "sharing", "node_ready", "node_cordoned")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    MIG_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARING_FIELD_NUMBER: _ClassVar[int]
    NODE_READY_FIELD_NUMBER: _ClassVar[int]
    NODE_CORDONED_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu: Gpu
    allocated_memory_bytes: int
    allocated_compute_share: float
    slices: int
    mig_layout: _containers.RepeatedScalarFieldContainer[str]
    sharing: Isolation
    node_ready: bool
    node_cordoned: bool
    def __init__(self, node: _Optional[str] = ..., gpu: _Optional[_Union[Gpu, _Mapping]] = ..., allocated_memory_bytes: _Optional[int] = ..., allocated_compute_share: _Optional[float] = ..., slices: _Optional[int] = ..., mig_layout: _Optional[_Iterable[str]] = ..., sharing: _Optional[_Union[Isolation, str]] = ..., node_ready: _Optional[bool] = ..., node_cordoned: _Optional[bool] = ...) -> None: ...
