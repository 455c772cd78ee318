"""One frame of the web view, read through the control plane's own servicers.

The web view answers exactly what the caller's gRPC calls would: each part is read by calling the
service's `Switch` (controlplane/controllers/standby.py) in-process with the caller's `Principal` set,
so the servicers apply their own tenant scoping (a tenant's token gets its own slices, workloads,
migrations and deployments) and a standby answers from its follower like its gRPC reads. A part the
caller may not read, or a standby cannot answer, is left empty and named in `unavailable`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from controlplane.api import auth
from gpumesh.v1 import (admin_service_pb2, deployment_service_pb2, event_service_pb2, migration_service_pb2,
                        slice_service_pb2, workload_service_pb2)
from mesh import fleetview
from mesh.client import gpu_status_to_dict, slice_to_dict, workload_to_dict

FINISHED_MIGRATIONS = ("done", "aborted")
FINISHED_WORKLOADS = ("succeeded", "failed", "stopped")
EVENTS_SHOWN = 50


class Refused(Exception):
    """A servicer aborted the in-process call (status code and message)."""

    def __init__(self, code: Any, message: str) -> None:
        super().__init__(message)
        self.code = code


class InProcessContext:
    """The part of a grpc.aio context the servicers use on a unary read."""

    def invocation_metadata(self):
        return ()

    def auth_context(self):
        return {}

    def peer(self) -> str:
        return "web-view"

    async def abort(self, code, details: str = "", trailing_metadata=()):
        raise Refused(code, details)

    async def abort_with_status(self, status):
        raise Refused(status.code, status.details)

    def set_trailing_metadata(self, *_a) -> None:
        pass


async def _call(switches: dict, service: str, method: str, request, unavailable: list[str]):
    sw = switches.get(service)
    if sw is None:
        unavailable.append(f"{service}.{method}: not served")
        return None
    try:
        return await getattr(sw, method)(request, InProcessContext())
    except Refused as e:
        unavailable.append(f"{service}.{method}: {e}")
        return None


async def take(switches: dict, principal: auth.Principal) -> dict[str, Any]:
    """The frame the page draws, as the caller may see it (run on the control plane's loop)."""
    token = auth._current.set(principal)
    try:
        return await _take(switches, principal)
    finally:
        auth._current.reset(token)


async def _take(switches: dict, principal: auth.Principal) -> dict[str, Any]:
    missing: list[str] = []
    gpus_resp = await _call(switches, "AdminService", "ListGpus", admin_service_pb2.ListGpusRequest(), missing)
    slices_resp = await _call(switches, "SliceService", "List", slice_service_pb2.ListSlicesRequest(), missing)
    wl_resp = await _call(switches, "WorkloadService", "List", workload_service_pb2.ListWorkloadsRequest(), missing)
    mig_resp = await _call(switches, "MigrationService", "List", migration_service_pb2.ListMigrationsRequest(),
                           missing)
    dep_resp = await _call(switches, "DeploymentService", "List", deployment_service_pb2.ListDeploymentsRequest(),
                           missing)
    ev_resp = await _call(switches, "EventService", "List", event_service_pb2.ListEventsRequest(limit=EVENTS_SHOWN),
                          missing)
    slices = [slice_to_dict(s) for s in (slices_resp.slices if slices_resp else ())]
    gpus = [gpu_status_to_dict(g) for g in (gpus_resp.gpus if gpus_resp else ())]
    nodes = []
    for name, rows in fleetview.node_rows(gpus).items():
        for g in rows:
            g["slots"] = fleetview.gpu_slots(g, slices)
            g["level"] = fleetview.level(g)
        nodes.append({"name": name, "ready": all(g["node_ready"] for g in rows),
                      "cordoned": any(g["cordoned"] for g in rows), "gpus": rows})
    from mesh.deployapi import deployment_to_dict
    from mesh.eventapi import event_to_dict
    from mesh.migrationapi import migration_to_dict
    migrations = [migration_to_dict(m) for m in (mig_resp.migrations if mig_resp else ())]
    workloads = [workload_to_dict(w) for w in (wl_resp.workloads if wl_resp else ())]
    for w in workloads:
        w.pop("env", None)                        # may carry a workload's secrets; the page never shows it
    for s in slices:
        s.pop("env", None)
    return {
        "principal": {"name": principal.name, "role": principal.role, "tenant": principal.tenant,
                      "admin": principal.admin},
        "nodes": nodes,
        "slices": slices,
        "workloads": [w for w in workloads if w["state"] not in FINISHED_WORKLOADS],
        "migrations": [m for m in migrations if m["phase"] not in FINISHED_MIGRATIONS],
        "deployments": [deployment_to_dict(d) for d in (dep_resp.deployments if dep_resp else ())],
        # the EventService's newest events the caller may see, newest first
        "events": [event_to_dict(e) for e in reversed(ev_resp.events if ev_resp else ())],
        "unavailable": missing,
    }


def stamp(frame: dict[str, Any]) -> dict[str, Any]:
    """The frame with the time it was sent (kept out of the comparison that decides whether to send)."""
    return {**frame, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


__all__ = ["take", "stamp", "InProcessContext", "Refused"]
