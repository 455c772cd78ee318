"""Typed errors shared by the control plane, the agent and the SDK.

Servers raise these; `controlplane.grpcerrors` turns them into gRPC statuses
with rich details (google.rpc.BadRequest / ErrorInfo), and the SDK
(`mesh.client`) turns those statuses back into the same exception types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import grpc

DOMAIN = "gpumesh.io"


@dataclass
class MeshError(Exception):
    """Base of every gpumesh error: a message and the gRPC code it maps to."""

    message: str
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.UNKNOWN, init=False)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass
class InvalidArgument(MeshError):
    """A request field is wrong. `field` is its path (e.g. `spec.memory_bytes`)."""

    field: str = ""
    allowed: str = ""
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.INVALID_ARGUMENT, init=False)

    @classmethod
    def of(cls, field_path: str, problem: str, allowed: str = "") -> "InvalidArgument":
        text = f"{field_path}: {problem}"
        if allowed:
            text += f" (allowed: {allowed})"
        return cls(text, field=field_path, allowed=allowed)


def shown(value: str, limit: int = 60) -> str:
    """`value` as an error message quotes it (repr), cut to about `limit` characters: a megabyte-long field is
    not echoed whole into the answer, the logs and the events."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


@dataclass
class NotFound(MeshError):
    kind: str = ""
    name: str = ""
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.NOT_FOUND, init=False)


@dataclass
class AlreadyExists(MeshError):
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.ALREADY_EXISTS, init=False)


REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
"""The google.rpc.ErrorInfo reason of RequestIdReused (mesh/richstatus.py)."""


@dataclass
class RequestIdReused(AlreadyExists):
    """An idempotency key (`field`, e.g. `request_id`) that an earlier call of the same tenant used with other
    arguments: its result is not this call's. A client bug (AWS's IdempotentParameterMismatch, Stripe's
    idempotency_error): resend the first call's arguments unchanged to get its result, or use a new key.
    ALREADY_EXISTS because what the key names exists, and no retry of this call can succeed."""

    field: str = "request_id"
    request_id: str = ""

    @classmethod
    def of(cls, request_id: str, call: str, field_path: str = "request_id") -> "RequestIdReused":
        return cls(f"{field_path}: {request_id!r} was used by an earlier {call} call with other arguments (an "
                   f"idempotency key names one request): resend that call's arguments unchanged to get its "
                   f"result, or use a new {field_path}", field=field_path, request_id=request_id)


@dataclass
class ResourceExhausted(MeshError):
    """A request could not be placed; `reasons` maps a node class to why not."""

    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.RESOURCE_EXHAUSTED, init=False)


@dataclass
class FailedPrecondition(MeshError):
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.FAILED_PRECONDITION, init=False)


@dataclass
class Unavailable(MeshError):
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.UNAVAILABLE, init=False)


@dataclass
class DeadlineExceeded(MeshError):
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.DEADLINE_EXCEEDED, init=False)


@dataclass
class Aborted(MeshError):
    """A guarded write lost a race; the caller may retry."""

    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.ABORTED, init=False)


@dataclass
class PermissionDenied(MeshError):
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.PERMISSION_DENIED, init=False)


@dataclass
class Unauthenticated(MeshError):
    """No credentials, or credentials the control plane does not accept."""

    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.UNAUTHENTICATED, init=False)



@dataclass
class MeshConnectionLost(MeshError):
    """A reconnecting mesh buffer (`mesh_open(conn, side=..., reconnect=True)`, `mesh.reconnect`) cannot carry
    on. `connection_id` names the connection; `state` is what it was when the buffer gave up."""

    connection_id: str = ""
    state: str = ""
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.UNAVAILABLE, init=False)


@dataclass
class MeshConnectionFailed(MeshConnectionLost):
    """The connection turned FAILED (a buffer's memory is gone); `reason` is its message. Disconnect, connect
    again."""

    reason: str = ""
    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.FAILED_PRECONDITION, init=False)


@dataclass
class MeshConnectionClosed(MeshConnectionLost):
    """The connection was disconnected (or its slice released): Get answers NOT_FOUND."""

    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.NOT_FOUND, init=False)


@dataclass
class MeshRecoveryTimeout(MeshConnectionLost):
    """The connection was not usable again within the buffer's `recover_timeout`."""

    code: grpc.StatusCode = dataclasses.field(default=grpc.StatusCode.DEADLINE_EXCEEDED, init=False)


@dataclass
class MeshSendUnconfirmed(MeshConnectionLost):
    """A two-sided send was cut by a broken channel: it may or may not have been queued, so it was not sent
    again (a reconnecting buffer never duplicates a message). Decide at the application level."""


BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
