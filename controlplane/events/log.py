"""The events held in memory: the table the EventService answers from, on the leader and on standbys.

The leader's `Recorder` puts into it once an event is durable; a standby's follower applies the etcd
watch to it. Either way `put`/`drop` publish an `EventNotice` to the watchers (bounded queues,
controlplane/api/events.py). Filters and tenant scoping live here so both answer alike.
"""

from __future__ import annotations

from controlplane.api.events import DEFAULT_LIMIT, Subscription
from gpumesh.v1 import event_service_pb2 as E

ADDED, MODIFIED, DELETED = E.EventNotice.ADDED, E.EventNotice.MODIFIED, E.EventNotice.DELETED


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def matches(ev: E.Event, f: E.EventFilter, tenant: str | None) -> bool:
    """`tenant` None: the caller may see every event (admin, no tenant asked); else only that tenant's."""
    if tenant is not None and ev.tenant != tenant:
        return False
    if f.kind and ev.kind.lower() != f.kind.lower():
        return False
    if f.name and ev.name != f.name:
        return False
    if f.type and ev.type.lower() != f.type.lower():
        return False
    if f.reason and ev.reason != f.reason:
        return False
    if f.node and ev.node != f.node:
        return False
    if f.HasField("since") and seconds(ev.last_timestamp) < seconds(f.since):
        return False
    return True


class EventLog:
    def __init__(self, max_queue: int = DEFAULT_LIMIT) -> None:
        self.events: dict[str, E.Event] = {}
        self.subscribers: set[Subscription] = set()
        self.max_queue = max_queue

    # -- changes ------------------------------------------------------------------------------

    def put(self, ev: E.Event) -> None:
        kind = MODIFIED if ev.id in self.events else ADDED
        self.events[ev.id] = ev
        self._publish(kind, ev)

    def drop(self, event_id: str) -> E.Event | None:
        ev = self.events.pop(event_id, None)
        if ev is not None:
            self._publish(DELETED, ev)
        return ev

    def clear(self) -> None:
        self.events.clear()

    # -- reads --------------------------------------------------------------------------------

    def select(self, f: E.EventFilter, tenant: str | None, limit: int = 0) -> list[E.Event]:
        out = [ev for ev in self.events.values() if matches(ev, f, tenant)]
        out.sort(key=lambda ev: (seconds(ev.last_timestamp), ev.id))
        return out[-limit:] if limit > 0 else out

    def oldest_first(self) -> list[E.Event]:
        return sorted(self.events.values(), key=lambda ev: (seconds(ev.last_timestamp), ev.id))

    # -- watchers -----------------------------------------------------------------------------

    def subscribe(self, what: str, context=None) -> Subscription:
        q = Subscription(what, self.max_queue, context)
        q.on_cut.append(self.subscribers.discard)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: Subscription) -> None:
        self.subscribers.discard(q)
        q.finish()

    def end_all(self) -> None:
        for q in list(self.subscribers):
            self.subscribers.discard(q)
            q.put_nowait(None)

    def _publish(self, kind: int, ev: E.Event) -> None:
        if not self.subscribers:
            return
        notice = E.EventNotice(type=kind, event=ev)
        for q in list(self.subscribers):
            q.put_nowait(notice)
