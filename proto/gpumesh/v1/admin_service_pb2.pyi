from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetVersionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "api", "python", "grpcio", "protobuf", "identity", "leader", "etcd_members")
    class EtcdMembersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    GRPCIO_FIELD_NUMBER: _ClassVar[int]
    PROTOBUF_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    ETCD_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    api: str
    python: str
    grpcio: str
    protobuf: str
    identity: str
    leader: bool
    etcd_members: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[str] = ..., api: _Optional[str] = ..., python: _Optional[str] = ..., grpcio: _Optional[str] = ..., protobuf: _Optional[str] = ..., identity: _Optional[str] = ..., leader: _Optional[bool] = ..., etcd_members: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _types_pb2.NodeState
    def __init__(self, state: _Optional[_Union[_types_pb2.NodeState, str]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_types_pb2.Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[_types_pb2.Node, _Mapping]]] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CordonNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UncordonNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("name", "dry_run")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    name: str
    dry_run: bool
    def __init__(self, name: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node", "evicted", "replacing")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    REPLACING_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    evicted: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    replacing: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., evicted: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ..., replacing: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ...) -> None: ...

class ListGpusRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: str
    def __init__(self, node: _Optional[str] = ...) -> None: ...

class ClearGpuQuarantineRequest(_message.Message):
    __slots__ = ("node", "gpu_index")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu_index: int
    def __init__(self, node: _Optional[str] = ..., gpu_index: _Optional[int] = ...) -> None: ...

class ListGpusResponse(_message.Message):
    __slots__ = ("gpus",)
    GPUS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[_types_pb2.GpuStatus]
    def __init__(self, gpus: _Optional[_Iterable[_Union[_types_pb2.GpuStatus, _Mapping]]] = ...) -> None: ...

class DeleteNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteNodeResponse(_message.Message):
    __slots__ = ("node", "slices", "allocations", "workloads", "migrations", "connections", "replicas")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    node: _types_pb2.Node
    slices: _containers.RepeatedScalarFieldContainer[str]
    allocations: _containers.RepeatedScalarFieldContainer[str]
    workloads: _containers.RepeatedScalarFieldContainer[str]
    migrations: _containers.RepeatedScalarFieldContainer[str]
    connections: _containers.RepeatedScalarFieldContainer[str]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[_Union[_types_pb2.Node, _Mapping]] = ..., slices: _Optional[_Iterable[str]] = ..., allocations: _Optional[_Iterable[str]] = ..., workloads: _Optional[_Iterable[str]] = ..., migrations: _Optional[_Iterable[str]] = ..., connections: _Optional[_Iterable[str]] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...
