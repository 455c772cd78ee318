"""The event part of the SDK (EventService): what the control plane did and why.

    with MeshClient(endpoint) as mesh:
        for ev in mesh.list_events(kind="Node", name="gpu-node-07"):
            print(ev.type, ev.reason, ev.count, ev.message)
        for notice in mesh.watch_events(type="Warning"):       # until cancelled
            print(notice.event.reason, notice.event.message)

`event_to_dict` is what `meshctl get events -o json|yaml` prints. Mixed into `mesh.client.MeshClient`;
errors are the typed `mesh.errors` ones.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterator

from gpumesh.v1 import event_service_pb2 as E
from gpumesh.v1 import event_service_pb2_grpc

NOTICE_NAMES = {E.EventNotice.ADDED: "ADDED", E.EventNotice.MODIFIED: "MODIFIED", E.EventNotice.DELETED: "DELETED",
                E.EventNotice.SYNCED: "SYNCED"}


def _converting(fn):
    from mesh.client import _converting as conv
    return conv(fn)


def event_filter(kind: str = "", name: str = "", type: str = "", since: Any = None, tenant: str = "",
                 reason: str = "", node: str = "") -> E.EventFilter:
    """`since`: a datetime, seconds since the epoch, or None."""
    f = E.EventFilter(kind=kind, name=name, type=type, tenant=tenant, reason=reason, node=node)
    if since is not None:
        if isinstance(since, _dt.datetime):
            f.since.FromDatetime(since.astimezone(_dt.timezone.utc).replace(tzinfo=None))
        else:
            f.since.FromNanoseconds(int(float(since) * 1e9))
    return f


class EventApi:
    _channel: Any
    timeout: float

    @property
    def _eventsvc(self) -> event_service_pb2_grpc.EventServiceStub:
        stub = self.__dict__.get("_event_stub")
        if stub is None:
            stub = self.__dict__["_event_stub"] = event_service_pb2_grpc.EventServiceStub(self._channel)
        return stub

    def list_events(self, kind: str = "", name: str = "", *, type: str = "", since: Any = None, tenant: str = "",
                    reason: str = "", node: str = "", limit: int = 0) -> list[E.Event]:
        """Recorded events that match, oldest first by last occurrence (`limit`: the newest that many)."""
        req = E.ListEventsRequest(filter=event_filter(kind, name, type, since, tenant, reason, node), limit=limit)
        return list(_converting(self._eventsvc.List)(req, timeout=self.timeout).events)

    def watch_events(self, kind: str = "", name: str = "", *, type: str = "", since: Any = None, tenant: str = "",
                     reason: str = "", node: str = "", send_initial: bool = False,
                     timeout: float | None = None) -> Iterator[E.EventNotice]:
        """EventNotices as events are recorded or repeat (after a SYNCED marker), until the caller stops."""
        import grpc
        from mesh import richstatus
        req = E.WatchEventsRequest(filter=event_filter(kind, name, type, since, tenant, reason, node),
                                   send_initial=send_initial)
        call = self._eventsvc.Watch(req, timeout=timeout)
        try:
            for notice in call:
                yield notice
        except grpc.RpcError as exc:
            raise richstatus.from_rpc_error(exc) from None
        finally:
            call.cancel()


def event_to_dict(ev: E.Event) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"id": ev.id, "kind": ev.kind, "name": ev.name, "tenant": ev.tenant, "type": ev.type,
            "reason": ev.reason, "message": ev.message, "count": ev.count,
            "first_timestamp": timestamp(ev, "first_timestamp"), "last_timestamp": timestamp(ev, "last_timestamp"),
            "source": ev.source, "node": ev.node}
