import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeshConnectionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESH_CONNECTION_STATE_UNSPECIFIED: _ClassVar[MeshConnectionState]
    MESH_CONNECTION_STATE_READY: _ClassVar[MeshConnectionState]
    MESH_CONNECTION_STATE_CLOSED: _ClassVar[MeshConnectionState]
    MESH_CONNECTION_STATE_FAILED: _ClassVar[MeshConnectionState]
    MESH_CONNECTION_STATE_RECOVERING: _ClassVar[MeshConnectionState]
MESH_CONNECTION_STATE_UNSPECIFIED: MeshConnectionState
MESH_CONNECTION_STATE_READY: MeshConnectionState
MESH_CONNECTION_STATE_CLOSED: MeshConnectionState
MESH_CONNECTION_STATE_FAILED: MeshConnectionState
MESH_CONNECTION_STATE_RECOVERING: MeshConnectionState

class BufferDescriptor(_message.Message):
    __slots__ = ("buffer_id", "slice_id", "node", "transport", "address", "length", "rkey", "lkey", "endpoint", "shm_name", "gid", "lid", "qp_num", "psn", "device", "port", "ipc_handle", "tls_sha256")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    RKEY_FIELD_NUMBER: _ClassVar[int]
    LKEY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    LID_FIELD_NUMBER: _ClassVar[int]
    QP_NUM_FIELD_NUMBER: _ClassVar[int]
    PSN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    TLS_SHA256_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    slice_id: str
    node: str
    transport: str
    address: int
    length: int
    rkey: int
    lkey: int
    endpoint: str
    shm_name: str
    gid: bytes
    lid: int
    qp_num: int
    psn: int
    device: str
    port: int
    ipc_handle: bytes
    tls_sha256: bytes
    def __init__(self, buffer_id: _Optional[str] = ..., slice_id: _Optional[str] = ..., node: _Optional[str] = ..., transport: _Optional[str] = ..., address: _Optional[int] = ..., length: _Optional[int] = ..., rkey: _Optional[int] = ..., lkey: _Optional[int] = ..., endpoint: _Optional[str] = ..., shm_name: _Optional[str] = ..., gid: _Optional[bytes] = ..., lid: _Optional[int] = ..., qp_num: _Optional[int] = ..., psn: _Optional[int] = ..., device: _Optional[str] = ..., port: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., tls_sha256: _Optional[bytes] = ...) -> None: ...

class MeshConnection(_message.Message):
    __slots__ = ("id", "transport", "slice_a", "slice_b", "a", "b", "state", "tenant", "size_bytes", "message", "created_at", "reason", "secret", "data_path", "fallback_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SLICE_A_FIELD_NUMBER: _ClassVar[int]
    SLICE_B_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    transport: str
    slice_a: str
    slice_b: str
    a: BufferDescriptor
    b: BufferDescriptor
    state: MeshConnectionState
    tenant: str
    size_bytes: int
    message: str
    created_at: _timestamp_pb2.Timestamp
    reason: str
    secret: bytes
    data_path: str
    fallback_reason: str
    def __init__(self, id: _Optional[str] = ..., transport: _Optional[str] = ..., slice_a: _Optional[str] = ..., slice_b: _Optional[str] = ..., a: _Optional[_Union[BufferDescriptor, _Mapping]] = ..., b: _Optional[_Union[BufferDescriptor, _Mapping]] = ..., state: _Optional[_Union[MeshConnectionState, str]] = ..., tenant: _Optional[str] = ..., size_bytes: _Optional[int] = ..., message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., secret: _Optional[bytes] = ..., data_path: _Optional[str] = ..., fallback_reason: _Optional[str] = ...) -> None: ...

class MeshConnectRequest(_message.Message):
    __slots__ = ("slice_a", "slice_b", "size_bytes", "transport")
    SLICE_A_FIELD_NUMBER: _ClassVar[int]
    SLICE_B_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    slice_a: str
    slice_b: str
    size_bytes: int
    transport: str
    def __init__(self, slice_a: _Optional[str] = ..., slice_b: _Optional[str] = ..., size_bytes: _Optional[int] = ..., transport: _Optional[str] = ...) -> None: ...

class GetMeshConnectionRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListMeshConnectionsRequest(_message.Message):
    __slots__ = ("tenant", "slice_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    slice_id: str
    def __init__(self, tenant: _Optional[str] = ..., slice_id: _Optional[str] = ...) -> None: ...

class ListMeshConnectionsResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: _containers.RepeatedCompositeFieldContainer[MeshConnection]
    def __init__(self, connections: _Optional[_Iterable[_Union[MeshConnection, _Mapping]]] = ...) -> None: ...

class DisconnectMeshRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class MeshGrantRequest(_message.Message):
    __slots__ = ("from_tenant", "to_tenant", "revoke")
    FROM_TENANT_FIELD_NUMBER: _ClassVar[int]
    TO_TENANT_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    from_tenant: str
    to_tenant: str
    revoke: bool
    def __init__(self, from_tenant: _Optional[str] = ..., to_tenant: _Optional[str] = ..., revoke: _Optional[bool] = ...) -> None: ...

class MeshGrant(_message.Message):
    __slots__ = ("from_tenant", "to_tenant", "created_at")
    FROM_TENANT_FIELD_NUMBER: _ClassVar[int]
    TO_TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    from_tenant: str
    to_tenant: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, from_tenant: _Optional[str] = ..., to_tenant: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListMeshGrantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMeshGrantsResponse(_message.Message):
    __slots__ = ("grants",)
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    grants: _containers.RepeatedCompositeFieldContainer[MeshGrant]
    def __init__(self, grants: _Optional[_Iterable[_Union[MeshGrant, _Mapping]]] = ...) -> None: ...

class MeshHello(_message.Message):
    __slots__ = ("endpoint", "transports", "buffers", "verbs_unavailable", "tls", "recoverable")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    VERBS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    buffers: _containers.RepeatedScalarFieldContainer[str]
    verbs_unavailable: str
    tls: bool
    recoverable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, endpoint: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ..., buffers: _Optional[_Iterable[str]] = ..., verbs_unavailable: _Optional[str] = ..., tls: _Optional[bool] = ..., recoverable: _Optional[_Iterable[str]] = ...) -> None: ...

class MeshRegister(_message.Message):
    __slots__ = ("request_id", "connection_id", "slice_id", "size_bytes", "transport", "secret", "recover")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    RECOVER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    connection_id: str
    slice_id: str
    size_bytes: int
    transport: str
    secret: bytes
    recover: bool
    def __init__(self, request_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., slice_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., transport: _Optional[str] = ..., secret: _Optional[bytes] = ..., recover: _Optional[bool] = ...) -> None: ...

class MeshRegistered(_message.Message):
    __slots__ = ("request_id", "descriptor", "error", "error_kind")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    descriptor: BufferDescriptor
    error: str
    error_kind: str
    def __init__(self, request_id: _Optional[str] = ..., descriptor: _Optional[_Union[BufferDescriptor, _Mapping]] = ..., error: _Optional[str] = ..., error_kind: _Optional[str] = ...) -> None: ...

class MeshBufferFailed(_message.Message):
    __slots__ = ("buffer_id", "connection_id", "slice_id", "reason", "message")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    connection_id: str
    slice_id: str
    reason: str
    message: str
    def __init__(self, buffer_id: _Optional[str] = ..., connection_id: _Optional[str] = ..., slice_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class MeshDeregister(_message.Message):
    __slots__ = ("buffer_ids", "reason", "request_id")
    BUFFER_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    buffer_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    request_id: str
    def __init__(self, buffer_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class MeshPeer(_message.Message):
    __slots__ = ("buffer_id", "peer", "request_id")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    peer: BufferDescriptor
    request_id: str
    def __init__(self, buffer_id: _Optional[str] = ..., peer: _Optional[_Union[BufferDescriptor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
