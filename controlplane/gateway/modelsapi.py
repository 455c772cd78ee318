"""Seed 002's model registration through the gateway: `POST /models` registers a model and
`DELETE /models/{name}` deletes one, by forwarding to the control plane's ModelService (the registry,
controlplane/serving/registry.py), which keeps them; the gateway keeps nothing. `GET /models` adds the
registry's models (`registered`) to the routable ones, asked of the control plane at each call (it is not on
the inference path; the serving view carries only the models that deployments use).

Admin only: the caller's token must be an admin's (a tenant's gets 403 here, before anything is sent), and it
is the CALLER's token that is forwarded, so the control plane checks it again. A gateway without client
authentication (no tenants_file: the local demo) forwards with its own token. The body is the model document
`meshctl model` reads (mesh/modelapi.py `model_from_dict`): bad input is a 400 naming the field, in OpenAI's
error shape; the registry's own checks come back the same way."""

from __future__ import annotations

import re

import grpc

from controlplane.gateway import validate
from controlplane.gateway.apierror import APIError
from controlplane.gateway.clients import Caller
from controlplane.gateway.forecastclient import _channel
from gpumesh.v1 import model_service_pb2 as MS
from gpumesh.v1 import model_service_pb2_grpc
from mesh import errors
from mesh.modelapi import model_from_dict, model_to_dict

DEADLINE_S = 30.0
_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
         grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
         grpc.StatusCode.NOT_FOUND: (404, "model_not_found"),
         grpc.StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
         grpc.StatusCode.ABORTED: (409, "aborted"),
         grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
         grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_token"),
         grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
         grpc.StatusCode.DEADLINE_EXCEEDED: (504, "control_plane_timeout")}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]'\"]*): ")


def _admin(gw, caller: Caller, what: str) -> None:
    if not gw.clients.enforced and not gw.cfg.insecure:
        # clients are not authenticated here (no tenants_file), but the gateway's own token is an admin's:
        # forwarding it for anyone would hand every HTTP client the registry
        raise APIError(403, f"authorization: {what} through the gateway needs clients authenticated by the "
                            "control plane's tokens (the gateway's tenants_file); or use `meshctl model`",
                       param="authorization", code="forbidden")
    if gw.clients.enforced and caller.tenant is not None:
        raise APIError(403, f"authorization: {what} needs an admin token (models are shared by every tenant; "
                            f"{caller.name!r} is a tenant's)", param="authorization", code="forbidden")


def _token(gw, authorization: str | None) -> str:
    if gw.clients.enforced:
        return (authorization or "").partition(" ")[2].strip()
    return gw.cfg.token


async def _call(gw, authorization: str | None, method: str, request):
    md = (("authorization", f"Bearer {tok}"),) if (tok := _token(gw, authorization)) else None
    targets = [t.strip() for t in gw.cfg.control_plane.split(",") if t.strip()]
    last = None
    for target in targets:        # a standby answers UNAVAILABLE: try the next control plane
        async with _channel(gw.cfg, target) as ch:
            stub = model_service_pb2_grpc.ModelServiceStub(ch)
            try:
                return await getattr(stub, method)(request, metadata=md, timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    status, code = _HTTP.get(e.code(), (502, "control_plane_error"))
                    m = _FIELD.match(e.details() or "")
                    field = m.group(1) if m and status == 400 else None
                    raise APIError(status, f"{e.details()}", param=field, code=code) from None
                last = f"{target}: {e.details()}"
    raise APIError(503, f"no control plane answered ({last or 'none configured'})", code="control_plane_unavailable",
                   headers={"retry-after": str(gw.cfg.retry_after_seconds)})


async def register(gw, caller: Caller, authorization: str | None, raw: bytes) -> dict:
    _admin(gw, caller, "registering a model")
    doc = validate.parse(raw)
    if "model" in doc and isinstance(doc["model"], dict) and len(doc) == 1:
        doc = doc["model"]                   # {"model": {...}} as well as the document itself
    for key in ("name", "variants"):
        if not doc.get(key):
            raise APIError(400, f"model.{key}: missing (a model needs a name and at least one variant; see "
                                f"docs/serving.md)", param=f"model.{key}", code="invalid_request_error")
    try:
        model = model_from_dict(doc)
    except errors.InvalidArgument as e:
        raise APIError(400, str(e), param=e.field, code="invalid_request_error") from None
    got = await _call(gw, authorization, "Register", MS.RegisterModelRequest(model=model))
    return model_to_dict(got)


async def delete(gw, caller: Caller, authorization: str | None, name: str) -> dict:
    _admin(gw, caller, "deleting a model")
    if not name or len(name) > 253:
        raise APIError(400, "name: a model name of 1 to 253 characters", param="name", code="invalid_request_error")
    got = await _call(gw, authorization, "Delete", MS.DeleteModelRequest(name=name))
    return {**model_to_dict(got), "deleted": True}


async def registered(gw, authorization: str | None) -> dict:
    """The registry's models (ModelService.List with the caller's token: models are shared by every tenant),
    names, families and variant names; {"registered_error": why} when the control plane does not answer."""
    try:
        got = await _call(gw, authorization, "List", MS.ListModelsRequest())
    except APIError as e:
        return {"registered": None, "registered_error": e.message}
    return {"registered": [{"name": m.name, "family": m.family, "variants": [v.name for v in m.variants]}
                           for m in sorted(got.models, key=lambda m: m.name)]}
