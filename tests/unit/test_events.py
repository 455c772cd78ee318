"""Durable events (controlplane/events/): coalescing, the pending bound, writes through the writer,
filters and tenant scoping, and expiry by age and count in the retention sweep."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.retention import Retention
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.events import EventLog, Recorder
from controlplane.events import recorder as recorder_mod
from controlplane.events.log import matches
from controlplane.state import keys
from controlplane.state.store import Delete, Put
from gpumesh.v1 import event_service_pb2 as E
from mesh import errors


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeWriter:
    """Records the ops it is handed (the real writer's interface); `fail` makes writes UNAVAILABLE."""

    failed = ""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.fail = False

    async def write(self, ops, conds=()):
        if self.fail:
            raise errors.Unavailable("etcd is down")
        self.batches.append(list(ops))
        return len(self.batches)


def recorder(clock=None, **kw) -> tuple[Recorder, FakeWriter, EventLog]:
    w, log = FakeWriter(), EventLog()
    return Recorder(w, log, clock=clock or Clock(), **kw), w, log


def test_repeats_coalesce_into_one_event_with_a_count():
    clock = Clock()
    rec, w, log = recorder(clock)
    rec.emit("Node", "n1", "Normal", "Cordoned", "marked unschedulable")
    clock.t += 5
    rec.emit("Node", "n1", "Normal", "Cordoned", "marked unschedulable")
    rec.emit("Node", "n1", "Warning", "NodeNotReady", "lease expired")
    assert asyncio.run(rec.flush()) == 2          # two distinct events, each written once
    puts = [op for batch in w.batches for op in batch]
    assert all(isinstance(op, Put) and op.key.startswith(keys.EVENTS.encode()) for op in puts)
    cordon = next(ev for ev in log.events.values() if ev.reason == "Cordoned")
    assert cordon.count == 2
    assert cordon.last_timestamp.seconds - cordon.first_timestamp.seconds == 5
    assert E.Event.FromString(next(op.value for op in puts if op.key == keys.event(cordon.id))) == cordon


def test_a_repeat_after_the_coalescing_window_is_a_new_event():
    clock = Clock()
    rec, _, log = recorder(clock, coalesce_seconds=60)
    rec.emit("Slice", "s-1", "Normal", "SliceReady", "pending -> ready")
    asyncio.run(rec.flush())
    clock.t += 61
    rec.emit("Slice", "s-1", "Normal", "SliceReady", "pending -> ready")
    asyncio.run(rec.flush())
    assert sorted(ev.count for ev in log.events.values()) == [1, 1]


def test_an_expired_event_is_not_resurrected_by_its_repeat():
    rec, _, log = recorder()
    rec.emit("Node", "n1", "Normal", "Cordoned", "x")
    asyncio.run(rec.flush())
    (first,) = log.events
    log.drop(first)                     # the retention sweep deleted it
    rec.emit("Node", "n1", "Normal", "Cordoned", "x")
    asyncio.run(rec.flush())
    (ev,) = log.events.values()
    assert ev.id != first and ev.count == 1


def test_pending_events_are_bounded_and_drops_counted():
    rec, _, log = recorder(max_pending=3)
    before = recorder_mod.DROPPED._value.get()
    for i in range(5):
        rec.emit("Gpu", f"n1/{i}", "Warning", "XidError", "xid 79")
    rec.emit("Gpu", "n1/0", "Warning", "XidError", "xid 79")     # a repeat of a pending one is kept
    assert len(rec.pending) == 3
    assert recorder_mod.DROPPED._value.get() - before == 2
    asyncio.run(rec.flush())
    assert {ev.name: ev.count for ev in log.events.values()} == {"n1/0": 2, "n1/1": 1, "n1/2": 1}


def test_emit_never_raises_and_a_failed_write_is_counted_not_raised():
    rec, w, log = recorder()
    rec.emit("Node", "n1", "Bogus", "Odd", "x" * 5000)          # bad type, long message: kept, not raised
    w.fail = True
    before = recorder_mod.WRITE_ERRORS._value.get()
    assert asyncio.run(rec.flush()) == 0
    assert recorder_mod.WRITE_ERRORS._value.get() - before == 1
    assert not log.events
    w.fail = False
    rec.emit("Node", "n1", "Bogus", "Odd", "x" * 5000)
    asyncio.run(rec.flush())
    (ev,) = log.events.values()
    assert ev.type == "Warning" and len(ev.message) == recorder_mod.MAX_MESSAGE


def test_the_flusher_writes_in_the_background_and_watchers_see_it():
    async def main():
        rec, w, log = recorder(flush_delay=0.01)
        q = log.subscribe("test")
        rec.start()
        rec.emit("Deployment", "chat", "Normal", "Scaled", "replicas 1 -> 2", tenant="acme")
        notice = await asyncio.wait_for(q.next(), 30)
        rec.emit("Deployment", "chat", "Normal", "Scaled", "replicas 1 -> 2", tenant="acme")
        again = await asyncio.wait_for(q.next(), 30)
        await rec.stop()
        return notice, again, w
    notice, again, w = asyncio.run(main())
    assert notice.type == E.EventNotice.ADDED and notice.event.reason == "Scaled"
    assert again.type == E.EventNotice.MODIFIED and again.event.count == 2 and again.event.id == notice.event.id
    assert len(w.batches) == 2


@pytest.mark.parametrize("filt, tenant, want", [
    (E.EventFilter(), None, {"n1", "s-a", "s-b"}),
    (E.EventFilter(), "acme", {"s-a"}),                                 # a tenant sees its objects only
    (E.EventFilter(kind="slice"), None, {"s-a", "s-b"}),
    (E.EventFilter(type="warning"), None, {"s-b"}),
    (E.EventFilter(name="n1"), None, {"n1"}),
    (E.EventFilter(node="n2"), None, {"s-b"}),
    (E.EventFilter(reason="Scheduled"), None, {"s-a"}),
])
def test_filters_and_tenant_scope(filt, tenant, want):
    clock = Clock()
    rec, _, log = recorder(clock)
    rec.emit("Node", "n1", "Normal", "Cordoned", "x", node="n1")
    rec.emit("Slice", "s-a", "Normal", "Scheduled", "x", tenant="acme", node="n1")
    rec.emit("Slice", "s-b", "Warning", "SliceFailed", "x", tenant="beta", node="n2")
    asyncio.run(rec.flush())
    assert {ev.name for ev in log.select(filt, tenant)} == want


def test_since_filter_and_limit_keeps_the_newest():
    clock = Clock()
    rec, _, log = recorder(clock)
    for i in range(5):
        rec.emit("Node", f"n{i}", "Normal", "Registered", "x")
        clock.t += 10
    asyncio.run(rec.flush())
    f = E.EventFilter()
    f.since.FromSeconds(int(clock.t - 25))
    assert [ev.name for ev in log.select(f, None)] == ["n3", "n4"]
    assert [ev.name for ev in log.select(E.EventFilter(), None, limit=2)] == ["n3", "n4"]
    assert matches(log.select(E.EventFilter(), None)[0], E.EventFilter(kind="NODE"), None)


class RecordingWriter:
    def __init__(self):
        self.deleted: list[bytes] = []

    async def write(self, ops, conds=()):
        self.deleted += [o.key for o in ops if isinstance(o, Delete)]
        return 1


def test_retention_expires_events_by_age_and_by_count():
    clock = Clock()
    rec, _, log = recorder(clock)
    for i in range(6):
        rec.emit("Node", f"old{i}", "Normal", "Registered", "x")
    clock.t += 3600
    for i in range(4):
        rec.emit("Node", f"new{i}", "Normal", "Registered", "x")
        clock.t += 1
    asyncio.run(rec.flush())
    ctl = Controller(store=None)
    ctl.writer = RecordingWriter()
    r = Retention(ctl, WorkloadManager(ctl), None, events=log, events_retention_s=1800, events_kept=3)
    counts = asyncio.run(r.sweep(clock.t))
    assert counts["events"] == 7                                     # 6 too old + the oldest new one over 3
    assert sorted(ev.name for ev in log.events.values()) == ["new1", "new2", "new3"]
    assert len(ctl.writer.deleted) == 7 and all(k.startswith(keys.EVENTS.encode()) for k in ctl.writer.deleted)
