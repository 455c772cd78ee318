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

class MemoryPressure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_PRESSURE_UNSPECIFIED: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_LOW: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_NORMAL: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_HIGH: _ClassVar[MemoryPressure]
    MEMORY_PRESSURE_CRITICAL: _ClassVar[MemoryPressure]

class ThermalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THERMAL_STATE_UNSPECIFIED: _ClassVar[ThermalState]
    THERMAL_STATE_NORMAL: _ClassVar[ThermalState]
    THERMAL_STATE_WARNING: _ClassVar[ThermalState]
    THERMAL_STATE_THROTTLING: _ClassVar[ThermalState]
    THERMAL_STATE_CRITICAL: _ClassVar[ThermalState]

class GpuHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_HEALTH_UNSPECIFIED: _ClassVar[GpuHealth]
    GPU_HEALTH_HEALTHY: _ClassVar[GpuHealth]
    GPU_HEALTH_UNHEALTHY: _ClassVar[GpuHealth]
    GPU_HEALTH_LOST: _ClassVar[GpuHealth]
    GPU_HEALTH_QUARANTINED: _ClassVar[GpuHealth]

class WorkloadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKLOAD_STATE_UNSPECIFIED: _ClassVar[WorkloadState]
    WORKLOAD_STATE_PENDING: _ClassVar[WorkloadState]
    WORKLOAD_STATE_RUNNING: _ClassVar[WorkloadState]
    WORKLOAD_STATE_SUCCEEDED: _ClassVar[WorkloadState]
    WORKLOAD_STATE_FAILED: _ClassVar[WorkloadState]
    WORKLOAD_STATE_STOPPED: _ClassVar[WorkloadState]
    WORKLOAD_STATE_UNKNOWN: _ClassVar[WorkloadState]
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
MEMORY_PRESSURE_UNSPECIFIED: MemoryPressure
MEMORY_PRESSURE_LOW: MemoryPressure
MEMORY_PRESSURE_NORMAL: MemoryPressure
MEMORY_PRESSURE_HIGH: MemoryPressure
MEMORY_PRESSURE_CRITICAL: MemoryPressure
THERMAL_STATE_UNSPECIFIED: ThermalState
THERMAL_STATE_NORMAL: ThermalState
THERMAL_STATE_WARNING: ThermalState
THERMAL_STATE_THROTTLING: ThermalState
THERMAL_STATE_CRITICAL: ThermalState
GPU_HEALTH_UNSPECIFIED: GpuHealth
GPU_HEALTH_HEALTHY: GpuHealth
GPU_HEALTH_UNHEALTHY: GpuHealth
GPU_HEALTH_LOST: GpuHealth
GPU_HEALTH_QUARANTINED: GpuHealth
WORKLOAD_STATE_UNSPECIFIED: WorkloadState
WORKLOAD_STATE_PENDING: WorkloadState
WORKLOAD_STATE_RUNNING: WorkloadState
WORKLOAD_STATE_SUCCEEDED: WorkloadState
WORKLOAD_STATE_FAILED: WorkloadState
WORKLOAD_STATE_STOPPED: WorkloadState
WORKLOAD_STATE_UNKNOWN: WorkloadState

class Placement(_message.Message):
    __slots__ = ("start", "size")
    START_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    start: int
    size: int
    def __init__(self, start: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class SliceSpec(_message.Message):
    __slots__ = ("tenant", "memory_bytes", "compute_share", "isolation", "gpu_model", "mig_profile", "count", "topology", "priority", "labels", "cpu_milli", "host_memory_bytes", "preempt", "anti_affinity")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AntiAffinityEntry(_message.Message):
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
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_FIELD_NUMBER: _ClassVar[int]
    ANTI_AFFINITY_FIELD_NUMBER: _ClassVar[int]
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
    cpu_milli: int
    host_memory_bytes: int
    preempt: bool
    anti_affinity: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., isolation: _Optional[_Union[Isolation, str]] = ..., gpu_model: _Optional[str] = ..., mig_profile: _Optional[str] = ..., count: _Optional[int] = ..., topology: _Optional[_Union[Topology, str]] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., cpu_milli: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ..., preempt: _Optional[bool] = ..., anti_affinity: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("id", "allocation_id", "tenant", "node", "gpu_uuid", "gpu_index", "gpu_model", "isolation", "profile", "placement", "memory_bytes", "compute_share", "state", "device_uuid", "env", "message", "priority", "labels", "created_at", "updated_at", "gpu_instance_id", "compute_instance_id", "cpu_milli", "host_memory_bytes", "anti_affinity", "resized_at")
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
    class AntiAffinityEntry(_message.Message):
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
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANTI_AFFINITY_FIELD_NUMBER: _ClassVar[int]
    RESIZED_AT_FIELD_NUMBER: _ClassVar[int]
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
    cpu_milli: int
    host_memory_bytes: int
    anti_affinity: _containers.ScalarMap[str, str]
    resized_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., allocation_id: _Optional[str] = ..., tenant: _Optional[str] = ..., node: _Optional[str] = ..., gpu_uuid: _Optional[str] = ..., gpu_index: _Optional[int] = ..., gpu_model: _Optional[str] = ..., isolation: _Optional[_Union[Isolation, str]] = ..., profile: _Optional[str] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., state: _Optional[_Union[SliceState, str]] = ..., device_uuid: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., message: _Optional[str] = ..., priority: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_instance_id: _Optional[int] = ..., compute_instance_id: _Optional[int] = ..., cpu_milli: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ..., anti_affinity: _Optional[_Mapping[str, str]] = ..., resized_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("hostname", "gpus", "nvlink_domains", "nics", "driver_version", "cuda_version", "gpu_backend", "labels", "cpu_milli", "memory_bytes")
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
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    nvlink_domains: _containers.RepeatedCompositeFieldContainer[NvlinkDomain]
    nics: _containers.RepeatedCompositeFieldContainer[Nic]
    driver_version: str
    cuda_version: str
    gpu_backend: str
    labels: _containers.ScalarMap[str, str]
    cpu_milli: int
    memory_bytes: int
    def __init__(self, hostname: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., nvlink_domains: _Optional[_Iterable[_Union[NvlinkDomain, _Mapping]]] = ..., nics: _Optional[_Iterable[_Union[Nic, _Mapping]]] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., gpu_backend: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., cpu_milli: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "state", "cordoned", "inventory", "slices", "ready_slices", "registered_at", "last_heartbeat", "agent_version", "message", "events", "ib_ports", "draining", "deleting", "agent_registered_at")
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
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    IB_PORTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    AGENT_REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
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
    events: _containers.RepeatedCompositeFieldContainer[NodeEvent]
    ib_ports: _containers.RepeatedCompositeFieldContainer[IbPort]
    draining: bool
    deleting: bool
    agent_registered_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., cordoned: _Optional[bool] = ..., inventory: _Optional[_Union[NodeInventory, _Mapping]] = ..., slices: _Optional[int] = ..., ready_slices: _Optional[int] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., agent_version: _Optional[str] = ..., message: _Optional[str] = ..., events: _Optional[_Iterable[_Union[NodeEvent, _Mapping]]] = ..., ib_ports: _Optional[_Iterable[_Union[IbPort, _Mapping]]] = ..., draining: _Optional[bool] = ..., deleting: _Optional[bool] = ..., agent_registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("node", "gpu", "allocated_memory_bytes", "allocated_compute_share", "slices", "mig_layout", "sharing", "node_ready", "node_cordoned", "telemetry")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    MIG_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARING_FIELD_NUMBER: _ClassVar[int]
    NODE_READY_FIELD_NUMBER: _ClassVar[int]
    NODE_CORDONED_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu: Gpu
    allocated_memory_bytes: int
    allocated_compute_share: float
    slices: int
    mig_layout: _containers.RepeatedScalarFieldContainer[str]
    sharing: Isolation
    node_ready: bool
    node_cordoned: bool
    telemetry: GpuTelemetry
    def __init__(self, node: _Optional[str] = ..., gpu: _Optional[_Union[Gpu, _Mapping]] = ..., allocated_memory_bytes: _Optional[int] = ..., allocated_compute_share: _Optional[float] = ..., slices: _Optional[int] = ..., mig_layout: _Optional[_Iterable[str]] = ..., sharing: _Optional[_Union[Isolation, str]] = ..., node_ready: _Optional[bool] = ..., node_cordoned: _Optional[bool] = ..., telemetry: _Optional[_Union[GpuTelemetry, _Mapping]] = ...) -> None: ...

class NvlinkLink(_message.Message):
    __slots__ = ("link", "active", "peer_pci_bus_id")
    LINK_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PEER_PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    link: int
    active: bool
    peer_pci_bus_id: str
    def __init__(self, link: _Optional[int] = ..., active: _Optional[bool] = ..., peer_pci_bus_id: _Optional[str] = ...) -> None: ...

class GpuTelemetry(_message.Message):
    __slots__ = ("index", "utilization_pct", "memory_used_bytes", "memory_total_bytes", "temperature_c", "power_w", "power_limit_w", "sm_clock_mhz", "memory_clock_mhz", "throttle_reasons", "ecc_corrected", "ecc_uncorrected", "nvlinks", "pci_bus_id", "numa_node", "cpu_affinity", "xid_events", "memory_pressure", "thermal_state", "health", "health_reason", "at", "remap_pending", "remap_failed", "retired_pages_pending", "incidents", "recovery")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    ECC_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    ECC_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    NVLINKS_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    CPU_AFFINITY_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    THERMAL_STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REMAP_PENDING_FIELD_NUMBER: _ClassVar[int]
    REMAP_FAILED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_PENDING_FIELD_NUMBER: _ClassVar[int]
    INCIDENTS_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    index: int
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float
    power_w: float
    power_limit_w: float
    sm_clock_mhz: int
    memory_clock_mhz: int
    throttle_reasons: _containers.RepeatedScalarFieldContainer[str]
    ecc_corrected: int
    ecc_uncorrected: int
    nvlinks: _containers.RepeatedCompositeFieldContainer[NvlinkLink]
    pci_bus_id: str
    numa_node: int
    cpu_affinity: str
    xid_events: _containers.RepeatedScalarFieldContainer[int]
    memory_pressure: MemoryPressure
    thermal_state: ThermalState
    health: GpuHealth
    health_reason: str
    at: _timestamp_pb2.Timestamp
    remap_pending: bool
    remap_failed: bool
    retired_pages_pending: bool
    incidents: _containers.RepeatedCompositeFieldContainer[_timestamp_pb2.Timestamp]
    recovery: str
    def __init__(self, index: _Optional[int] = ..., utilization_pct: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., sm_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., throttle_reasons: _Optional[_Iterable[str]] = ..., ecc_corrected: _Optional[int] = ..., ecc_uncorrected: _Optional[int] = ..., nvlinks: _Optional[_Iterable[_Union[NvlinkLink, _Mapping]]] = ..., pci_bus_id: _Optional[str] = ..., numa_node: _Optional[int] = ..., cpu_affinity: _Optional[str] = ..., xid_events: _Optional[_Iterable[int]] = ..., memory_pressure: _Optional[_Union[MemoryPressure, str]] = ..., thermal_state: _Optional[_Union[ThermalState, str]] = ..., health: _Optional[_Union[GpuHealth, str]] = ..., health_reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., remap_pending: _Optional[bool] = ..., remap_failed: _Optional[bool] = ..., retired_pages_pending: _Optional[bool] = ..., incidents: _Optional[_Iterable[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]]] = ..., recovery: _Optional[str] = ...) -> None: ...

class SliceTelemetry(_message.Message):
    __slots__ = ("slice_id", "utilization_pct", "memory_used_bytes", "pids")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    utilization_pct: float
    memory_used_bytes: int
    pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, slice_id: _Optional[str] = ..., utilization_pct: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., pids: _Optional[_Iterable[int]] = ...) -> None: ...

class IbPort(_message.Message):
    __slots__ = ("device", "port", "state", "rate_gbps", "port_guid", "link_layer")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RATE_GBPS_FIELD_NUMBER: _ClassVar[int]
    PORT_GUID_FIELD_NUMBER: _ClassVar[int]
    LINK_LAYER_FIELD_NUMBER: _ClassVar[int]
    device: str
    port: int
    state: str
    rate_gbps: float
    port_guid: str
    link_layer: str
    def __init__(self, device: _Optional[str] = ..., port: _Optional[int] = ..., state: _Optional[str] = ..., rate_gbps: _Optional[float] = ..., port_guid: _Optional[str] = ..., link_layer: _Optional[str] = ...) -> None: ...

class NodeTelemetry(_message.Message):
    __slots__ = ("gpus", "slices", "ib_ports", "at", "backends")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    IB_PORTS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuTelemetry]
    slices: _containers.RepeatedCompositeFieldContainer[SliceTelemetry]
    ib_ports: _containers.RepeatedCompositeFieldContainer[IbPort]
    at: _timestamp_pb2.Timestamp
    backends: _containers.RepeatedCompositeFieldContainer[BackendLoad]
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuTelemetry, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[SliceTelemetry, _Mapping]]] = ..., ib_ports: _Optional[_Iterable[_Union[IbPort, _Mapping]]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., backends: _Optional[_Iterable[_Union[BackendLoad, _Mapping]]] = ...) -> None: ...

class BackendLoad(_message.Message):
    __slots__ = ("workload_id", "kind", "endpoint", "at", "scraped", "error", "requests_running", "requests_waiting", "kv_cache_usage", "prompt_tokens_per_second", "generation_tokens_per_second", "ttft_seconds", "prompt_tokens_total", "generation_tokens_total", "requests_total", "gpu_memory_pressure", "gpu_thermal_state")
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SCRAPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    GPU_THERMAL_STATE_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    kind: str
    endpoint: str
    at: _timestamp_pb2.Timestamp
    scraped: bool
    error: str
    requests_running: float
    requests_waiting: float
    kv_cache_usage: float
    prompt_tokens_per_second: float
    generation_tokens_per_second: float
    ttft_seconds: float
    prompt_tokens_total: float
    generation_tokens_total: float
    requests_total: float
    gpu_memory_pressure: MemoryPressure
    gpu_thermal_state: ThermalState
    def __init__(self, workload_id: _Optional[str] = ..., kind: _Optional[str] = ..., endpoint: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scraped: _Optional[bool] = ..., error: _Optional[str] = ..., requests_running: _Optional[float] = ..., requests_waiting: _Optional[float] = ..., kv_cache_usage: _Optional[float] = ..., prompt_tokens_per_second: _Optional[float] = ..., generation_tokens_per_second: _Optional[float] = ..., ttft_seconds: _Optional[float] = ..., prompt_tokens_total: _Optional[float] = ..., generation_tokens_total: _Optional[float] = ..., requests_total: _Optional[float] = ..., gpu_memory_pressure: _Optional[_Union[MemoryPressure, str]] = ..., gpu_thermal_state: _Optional[_Union[ThermalState, str]] = ...) -> None: ...

class NodeEvent(_message.Message):
    __slots__ = ("at", "type", "reason", "message", "gpu_index")
    AT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    type: str
    reason: str
    message: str
    gpu_index: int
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., gpu_index: _Optional[int] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("id", "slice_id", "node", "tenant", "command", "env", "state", "pid", "exit_code", "created_at", "started_at", "finished_at", "message", "labels", "backend", "endpoint", "network_address", "endpoint_certificate")
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
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    slice_id: str
    node: str
    tenant: str
    command: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    state: WorkloadState
    pid: int
    exit_code: int
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    message: str
    labels: _containers.ScalarMap[str, str]
    backend: ServingBackend
    endpoint: str
    network_address: str
    endpoint_certificate: str
    def __init__(self, id: _Optional[str] = ..., slice_id: _Optional[str] = ..., node: _Optional[str] = ..., tenant: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[WorkloadState, str]] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., backend: _Optional[_Union[ServingBackend, _Mapping]] = ..., endpoint: _Optional[str] = ..., network_address: _Optional[str] = ..., endpoint_certificate: _Optional[str] = ...) -> None: ...

class ServingBackend(_message.Message):
    __slots__ = ("kind", "artifact", "served_name", "context", "concurrency", "gpu_layers", "gpu_memory_utilization", "memory_bytes", "device", "dtype", "api_key", "artifact_sha256")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SERVED_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    GPU_LAYERS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    kind: str
    artifact: str
    served_name: str
    context: int
    concurrency: int
    gpu_layers: int
    gpu_memory_utilization: float
    memory_bytes: int
    device: str
    dtype: str
    api_key: str
    artifact_sha256: str
    def __init__(self, kind: _Optional[str] = ..., artifact: _Optional[str] = ..., served_name: _Optional[str] = ..., context: _Optional[int] = ..., concurrency: _Optional[int] = ..., gpu_layers: _Optional[int] = ..., gpu_memory_utilization: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., api_key: _Optional[str] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...
