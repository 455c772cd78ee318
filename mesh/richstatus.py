"""Encode MeshErrors as google.rpc.Status with details, and decode them back.

INVALID_ARGUMENT carries a `google.rpc.BadRequest` (one field violation);
RESOURCE_EXHAUSTED carries a `google.rpc.ErrorInfo` whose metadata maps each
node class to the reason it could not take the request; ALREADY_EXISTS for a
reused idempotency key carries an ErrorInfo of reason REQUEST_ID_REUSED whose
metadata names the field and the key.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mesh import errors


def to_status(err: errors.MeshError) -> grpc.Status:
    """The grpc.Status (with details) for `err`, for `context.abort_with_status`."""
    details = []
    if isinstance(err, errors.InvalidArgument):
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=err.field, description=err.message)
        details.append(bad)
    elif isinstance(err, errors.RequestIdReused):
        details.append(error_details_pb2.ErrorInfo(
            reason=errors.REQUEST_ID_REUSED, domain=errors.DOMAIN,
            metadata={"field": err.field, "request_id": err.request_id}))
    elif isinstance(err, errors.ResourceExhausted):
        details.append(error_details_pb2.ErrorInfo(
            reason="UNSCHEDULABLE", domain=errors.DOMAIN, metadata=dict(err.reasons)))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=packed)
    return rpc_status.to_status(status)


def from_rpc_error(exc: grpc.RpcError) -> errors.MeshError:
    """The MeshError a failed call stands for (a plain MeshError for other codes)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    message = message or code.name
    status = None
    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError, TypeError):
        status = None
    cls = errors.BY_CODE.get(code)
    if cls is errors.InvalidArgument:
        field_path = ""
        for d in status.details if status else []:
            bad = error_details_pb2.BadRequest()
            if d.Unpack(bad) and bad.field_violations:
                field_path = bad.field_violations[0].field
        return errors.InvalidArgument(message, field=field_path)
    if cls is errors.ResourceExhausted:
        reasons: dict[str, str] = {}
        for d in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info):
                reasons = dict(info.metadata)
        return errors.ResourceExhausted(message, reasons=reasons)
    if cls is errors.AlreadyExists:
        for d in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info) and info.reason == errors.REQUEST_ID_REUSED and info.domain == errors.DOMAIN:
                return errors.RequestIdReused(message, field=info.metadata.get("field", "request_id"),
                                              request_id=info.metadata.get("request_id", ""))
    if cls is not None:
        return cls(message)
    err = errors.MeshError(message)
    err.code = code
    return err


__all__ = ["to_status", "from_rpc_error", "code_pb2"]


def stream(call):
    """The messages of a server-streaming `call`, its errors as MeshErrors; the call is cancelled when the caller
    stops iterating (or it ends)."""
    try:
        yield from call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    finally:
        call.cancel()
