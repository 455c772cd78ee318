"""EventService: List and Watch over an `EventLog` (the leader's, or a standby follower's).

A tenant's caller sees only the events of its tenant's objects (Allocation, Slice, Workload,
Migration, Deployment, Replica, and a Pool's about its deployments); events of the fleet itself (Node,
Gpu, a Pool's own changes) carry no tenant and are seen by admins. Naming another tenant is PERMISSION_DENIED, as in every List of the API.
"""

from __future__ import annotations

from controlplane.api import auth
from controlplane.api.rpc import streaming, unary
from controlplane.events.log import EventLog, matches
from gpumesh.v1 import event_service_pb2 as E
from gpumesh.v1 import event_service_pb2_grpc
from mesh import errors

MAX_FIELD = 256


def _check(f: E.EventFilter) -> str | None:
    """The tenant scope of a filter: None when the caller sees everything it asks for."""
    for field in ("kind", "name", "type", "reason", "node", "tenant"):
        value = getattr(f, field)
        if len(value) > MAX_FIELD or not value.isprintable():
            raise errors.InvalidArgument.of(f"filter.{field}", "is not valid",
                                            f"printable, at most {MAX_FIELD} characters")
    if f.type and f.type.lower() not in ("normal", "warning"):
        raise errors.InvalidArgument.of("filter.type", f"{f.type!r} is not allowed", "Normal, Warning")
    tenant = auth.scope_tenant(f.tenant, "filter.tenant")
    return tenant if (tenant or not auth.current().admin) else None


class EventService(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, event_log: EventLog) -> None:
        self.log = event_log

    @unary
    async def List(self, request, context):
        if request.limit < 0:
            raise errors.InvalidArgument.of("limit", f"{request.limit} is negative", "0 (all) or more")
        tenant = _check(request.filter)
        return E.ListEventsResponse(events=self.log.select(request.filter, tenant, request.limit))

    @streaming
    async def Watch(self, request, context):
        f = request.filter
        tenant = _check(f)
        q = self.log.subscribe("EventService.Watch", context)
        try:
            if request.send_initial:
                for ev in self.log.select(f, tenant):
                    yield E.EventNotice(type=E.EventNotice.ADDED, event=ev)
            yield E.EventNotice(type=E.EventNotice.SYNCED)
            while True:
                notice = await q.next()         # ResourceExhausted once this watcher fell behind
                if notice is None:
                    raise errors.Aborted("the watch was ended by the control plane (a standby reloaded or "
                                         "stepped down): list again and watch again")
                if matches(notice.event, f, tenant):
                    yield notice
        finally:
            self.log.unsubscribe(q)
