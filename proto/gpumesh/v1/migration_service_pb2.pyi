import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpumesh.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_PHASE_UNSPECIFIED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_PLANNED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_TARGET_READY: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_COPYING: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_PAUSED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_COMMITTED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_DONE: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_ROLLING_BACK: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_ABORTED: _ClassVar[MigrationPhase]

class MigrationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_MODE_UNSPECIFIED: _ClassVar[MigrationMode]
    MIGRATION_MODE_PRECOPY: _ClassVar[MigrationMode]
    MIGRATION_MODE_STOP_AND_COPY: _ClassVar[MigrationMode]
    MIGRATION_MODE_TRANSPARENT: _ClassVar[MigrationMode]
MIGRATION_PHASE_UNSPECIFIED: MigrationPhase
MIGRATION_PHASE_PLANNED: MigrationPhase
MIGRATION_PHASE_TARGET_READY: MigrationPhase
MIGRATION_PHASE_COPYING: MigrationPhase
MIGRATION_PHASE_PAUSED: MigrationPhase
MIGRATION_PHASE_COMMITTED: MigrationPhase
MIGRATION_PHASE_DONE: MigrationPhase
MIGRATION_PHASE_ROLLING_BACK: MigrationPhase
MIGRATION_PHASE_ABORTED: MigrationPhase
MIGRATION_MODE_UNSPECIFIED: MigrationMode
MIGRATION_MODE_PRECOPY: MigrationMode
MIGRATION_MODE_STOP_AND_COPY: MigrationMode
MIGRATION_MODE_TRANSPARENT: MigrationMode

class MigrationRound(_message.Message):
    __slots__ = ("round", "entries", "bytes", "seconds", "paused")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    round: int
    entries: int
    bytes: int
    seconds: float
    paused: bool
    def __init__(self, round: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., paused: _Optional[bool] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("id", "workload_id", "tenant", "mode", "phase", "source_node", "source_slice", "target_node", "target_slice", "target_allocated", "session", "target_address", "bytes_sent", "state_bytes", "round", "mb_per_s", "rounds", "step", "downtime_ms", "total_ms", "message", "reason", "checkpoint_id", "created_at", "updated_at", "resize_slice", "transfer")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SLICE_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_SLICE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MB_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SLICE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    id: str
    workload_id: str
    tenant: str
    mode: MigrationMode
    phase: MigrationPhase
    source_node: str
    source_slice: str
    target_node: str
    target_slice: str
    target_allocated: bool
    session: str
    target_address: str
    bytes_sent: int
    state_bytes: int
    round: int
    mb_per_s: float
    rounds: _containers.RepeatedCompositeFieldContainer[MigrationRound]
    step: int
    downtime_ms: float
    total_ms: float
    message: str
    reason: str
    checkpoint_id: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    resize_slice: str
    transfer: str
    def __init__(self, id: _Optional[str] = ..., workload_id: _Optional[str] = ..., tenant: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., phase: _Optional[_Union[MigrationPhase, str]] = ..., source_node: _Optional[str] = ..., source_slice: _Optional[str] = ..., target_node: _Optional[str] = ..., target_slice: _Optional[str] = ..., target_allocated: _Optional[bool] = ..., session: _Optional[str] = ..., target_address: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., state_bytes: _Optional[int] = ..., round: _Optional[int] = ..., mb_per_s: _Optional[float] = ..., rounds: _Optional[_Iterable[_Union[MigrationRound, _Mapping]]] = ..., step: _Optional[int] = ..., downtime_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resize_slice: _Optional[str] = ..., transfer: _Optional[str] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("workload_id", "to_node", "to_slice", "mode")
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_FIELD_NUMBER: _ClassVar[int]
    TO_SLICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    to_node: str
    to_slice: str
    mode: MigrationMode
    def __init__(self, workload_id: _Optional[str] = ..., to_node: _Optional[str] = ..., to_slice: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ...) -> None: ...

class GetMigrationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ("workload_id", "tenant")
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    tenant: str
    def __init__(self, workload_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListMigrationsResponse(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[Migration]
    def __init__(self, migrations: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("workload_id",)
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    def __init__(self, workload_id: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("id", "workload_id", "tenant", "node", "path", "step", "bytes", "seconds", "mb_per_s", "encrypted", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MB_PER_S_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    workload_id: str
    tenant: str
    node: str
    path: str
    step: int
    bytes: int
    seconds: float
    mb_per_s: float
    encrypted: bool
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., workload_id: _Optional[str] = ..., tenant: _Optional[str] = ..., node: _Optional[str] = ..., path: _Optional[str] = ..., step: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., mb_per_s: _Optional[float] = ..., encrypted: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("checkpoint_id", "to_node", "to_slice")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_NODE_FIELD_NUMBER: _ClassVar[int]
    TO_SLICE_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    to_node: str
    to_slice: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., to_node: _Optional[str] = ..., to_slice: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("workload_id", "tenant")
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    workload_id: str
    tenant: str
    def __init__(self, workload_id: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "usage")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    usage: _containers.RepeatedCompositeFieldContainer[CheckpointUsage]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[CheckpointUsage, _Mapping]]] = ...) -> None: ...

class CheckpointUsage(_message.Message):
    __slots__ = ("tenant", "bytes", "limit_bytes")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bytes: int
    limit_bytes: int
    def __init__(self, tenant: _Optional[str] = ..., bytes: _Optional[int] = ..., limit_bytes: _Optional[int] = ...) -> None: ...

class ResizeRequest(_message.Message):
    __slots__ = ("slice_id", "memory_bytes", "compute_share", "mig_profile")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    memory_bytes: int
    compute_share: float
    mig_profile: str
    def __init__(self, slice_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., compute_share: _Optional[float] = ..., mig_profile: _Optional[str] = ...) -> None: ...

class MigrationCommand(_message.Message):
    __slots__ = ("migration_id", "action", "workload_id", "workload", "session", "address", "mode", "path", "tenant", "max_rounds", "stop_bytes", "slices", "alias", "secret", "peer", "checkpoint_key", "max_bytes")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[MigrationCommand.Action]
        START_TARGET: _ClassVar[MigrationCommand.Action]
        SEND: _ClassVar[MigrationCommand.Action]
        PUSH_CHECKPOINT: _ClassVar[MigrationCommand.Action]
        RESUME_TARGET: _ClassVar[MigrationCommand.Action]
        STOP_SOURCE: _ClassVar[MigrationCommand.Action]
        ABORT_SOURCE: _ClassVar[MigrationCommand.Action]
        STOP_TARGET: _ClassVar[MigrationCommand.Action]
        CHECKPOINT: _ClassVar[MigrationCommand.Action]
        SWAP_SLICES: _ClassVar[MigrationCommand.Action]
        CHECK_TRANSPARENT: _ClassVar[MigrationCommand.Action]
        CHECK_SDK: _ClassVar[MigrationCommand.Action]
        DELETE_CHECKPOINT: _ClassVar[MigrationCommand.Action]
    ACTION_UNSPECIFIED: MigrationCommand.Action
    START_TARGET: MigrationCommand.Action
    SEND: MigrationCommand.Action
    PUSH_CHECKPOINT: MigrationCommand.Action
    RESUME_TARGET: MigrationCommand.Action
    STOP_SOURCE: MigrationCommand.Action
    ABORT_SOURCE: MigrationCommand.Action
    STOP_TARGET: MigrationCommand.Action
    CHECKPOINT: MigrationCommand.Action
    SWAP_SLICES: MigrationCommand.Action
    CHECK_TRANSPARENT: MigrationCommand.Action
    CHECK_SDK: MigrationCommand.Action
    DELETE_CHECKPOINT: MigrationCommand.Action
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STOP_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    action: MigrationCommand.Action
    workload_id: str
    workload: _types_pb2.Workload
    session: str
    address: str
    mode: MigrationMode
    path: str
    tenant: str
    max_rounds: int
    stop_bytes: int
    slices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Slice]
    alias: str
    secret: bytes
    peer: str
    checkpoint_key: bytes
    max_bytes: int
    def __init__(self, migration_id: _Optional[str] = ..., action: _Optional[_Union[MigrationCommand.Action, str]] = ..., workload_id: _Optional[str] = ..., workload: _Optional[_Union[_types_pb2.Workload, _Mapping]] = ..., session: _Optional[str] = ..., address: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., path: _Optional[str] = ..., tenant: _Optional[str] = ..., max_rounds: _Optional[int] = ..., stop_bytes: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[_types_pb2.Slice, _Mapping]]] = ..., alias: _Optional[str] = ..., secret: _Optional[bytes] = ..., peer: _Optional[str] = ..., checkpoint_key: _Optional[bytes] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class MigrationReport(_message.Message):
    __slots__ = ("migration_id", "event", "address", "step", "bytes", "state_bytes", "mb_per_s", "round", "downtime_ms", "total_ms", "message", "path", "seconds", "encrypted", "transfer")
    class Event(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EVENT_UNSPECIFIED: _ClassVar[MigrationReport.Event]
        TARGET_LISTENING: _ClassVar[MigrationReport.Event]
        PROGRESS: _ClassVar[MigrationReport.Event]
        SOURCE_PAUSED: _ClassVar[MigrationReport.Event]
        RESTORED: _ClassVar[MigrationReport.Event]
        TARGET_RESUMED: _ClassVar[MigrationReport.Event]
        SOURCE_STOPPED: _ClassVar[MigrationReport.Event]
        SOURCE_RESUMED: _ClassVar[MigrationReport.Event]
        TARGET_STOPPED: _ClassVar[MigrationReport.Event]
        CHECKPOINTED: _ClassVar[MigrationReport.Event]
        FAILED: _ClassVar[MigrationReport.Event]
        SLICES_SWAPPED: _ClassVar[MigrationReport.Event]
        TRANSPARENT_OK: _ClassVar[MigrationReport.Event]
        SDK_OK: _ClassVar[MigrationReport.Event]
    EVENT_UNSPECIFIED: MigrationReport.Event
    TARGET_LISTENING: MigrationReport.Event
    PROGRESS: MigrationReport.Event
    SOURCE_PAUSED: MigrationReport.Event
    RESTORED: MigrationReport.Event
    TARGET_RESUMED: MigrationReport.Event
    SOURCE_STOPPED: MigrationReport.Event
    SOURCE_RESUMED: MigrationReport.Event
    TARGET_STOPPED: MigrationReport.Event
    CHECKPOINTED: MigrationReport.Event
    FAILED: MigrationReport.Event
    SLICES_SWAPPED: MigrationReport.Event
    TRANSPARENT_OK: MigrationReport.Event
    SDK_OK: MigrationReport.Event
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MB_PER_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    event: MigrationReport.Event
    address: str
    step: int
    bytes: int
    state_bytes: int
    mb_per_s: float
    round: MigrationRound
    downtime_ms: float
    total_ms: float
    message: str
    path: str
    seconds: float
    encrypted: bool
    transfer: str
    def __init__(self, migration_id: _Optional[str] = ..., event: _Optional[_Union[MigrationReport.Event, str]] = ..., address: _Optional[str] = ..., step: _Optional[int] = ..., bytes: _Optional[int] = ..., state_bytes: _Optional[int] = ..., mb_per_s: _Optional[float] = ..., round: _Optional[_Union[MigrationRound, _Mapping]] = ..., downtime_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., message: _Optional[str] = ..., path: _Optional[str] = ..., seconds: _Optional[float] = ..., encrypted: _Optional[bool] = ..., transfer: _Optional[str] = ...) -> None: ...
