from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AllocateRequest(_message.Message):
    __slots__ = ("spec", "request_id", "no_wait", "timeout_seconds")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.SliceSpec
    request_id: str
    no_wait: bool
    timeout_seconds: float
    def __init__(self, spec: _Optional[_Union[_types_pb2.SliceSpec, _Mapping]] = ..., request_id: _Optional[str] = ..., no_wait: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("allocation_id", "slices")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    slices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    def __init__(self, allocation_id: _Optional[str] = ..., slices: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("slices",)
    SLICES_FIELD_NUMBER: _ClassVar[int]
    slices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    def __init__(self, slices: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ...) -> None: ...

class GetSliceRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListSlicesRequest(_message.Message):
    __slots__ = ("tenant", "node", "state", "allocation_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    node: str
    state: _types_pb2.SliceState
    allocation_id: str
    def __init__(self, tenant: _Optional[str] = ..., node: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.SliceState, str]] = ..., allocation_id: _Optional[str] = ...) -> None: ...

class ListSlicesResponse(_message.Message):
    __slots__ = ("slices",)
    SLICES_FIELD_NUMBER: _ClassVar[int]
    slices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    def __init__(self, slices: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ...) -> None: ...

class WatchSlicesRequest(_message.Message):
    __slots__ = ("tenant", "node", "send_initial")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    node: str
    send_initial: bool
    def __init__(self, tenant: _Optional[str] = ..., node: _Optional[str] = ..., send_initial: _Optional[bool] = ...) -> None: ...

class SliceEvent(_message.Message):
    __slots__ = ("type", "slice", "revision")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[SliceEvent.Type]
        ADDED: _ClassVar[SliceEvent.Type]
        MODIFIED: _ClassVar[SliceEvent.Type]
        DELETED: _ClassVar[SliceEvent.Type]
        SYNCED: _ClassVar[SliceEvent.Type]
    TYPE_UNSPECIFIED: SliceEvent.Type
    ADDED: SliceEvent.Type
    MODIFIED: SliceEvent.Type
    DELETED: SliceEvent.Type
    SYNCED: SliceEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: SliceEvent.Type
    slice: _types_pb2.Slice
    revision: int
    def __init__(self, type: _Optional[_Union[SliceEvent.Type, str]] = ..., slice: _Optional[_Union[_types_pb2.Slice, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...
