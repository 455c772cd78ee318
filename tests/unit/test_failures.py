"""Failures are seen (issue 10, section 4): the supervised etcd writer, the read-back by revision, slow
watchers and internal followers cut off (and resyncing), ready-waiters of deleted slices, bounded outboxes."""

import asyncio

import pytest

from controlplane.controllers.slices import Controller
from controlplane.api.events import DELETED, MODIFIED, EventHub
from controlplane.state.store import EtcdStore, Put
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state.writer import Writer
from gpumesh.v1 import types_pb2
from mesh import errors


class FlakyStore:
    """A store whose commit fails with an unexpected exception `fail` times (a bug, not an etcd error)."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.commits = 0

    async def commit(self, ops, conds=()):
        self.commits += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("boom: an unexpected bug in the commit path")
        return 100 + self.commits


async def test_writer_fails_the_inflight_writes_and_restarts_after_an_unexpected_exception():
    w = Writer(FlakyStore(fail=1))
    w.start()
    try:
        with pytest.raises(errors.Unavailable, match="etcd writer failed"):
            await asyncio.wait_for(w.write([Put(b"/gpumesh/v1/a", b"1")]), 10)
        # restarted: the next write goes through
        assert await asyncio.wait_for(w.write([Put(b"/gpumesh/v1/a", b"2")]), 10) > 100
        assert w.restarts == 1 and not w.failed
    finally:
        await w.stop()


async def test_writer_that_cannot_restart_gives_up_and_calls_on_fatal():
    w = Writer(FlakyStore(fail=10 ** 6), max_restarts=2, restart_window=60)
    fatal = []
    w.on_fatal.append(fatal.append)
    w.start()
    try:
        for _ in range(3):
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(w.write([Put(b"/gpumesh/v1/a", b"1")]), 10)
        await asyncio.wait_for(w.task, 10)          # the supervisor returned: it gave up
        assert fatal and "RuntimeError" in fatal[0]
        with pytest.raises(errors.Unavailable, match="stepped down"):
            await asyncio.wait_for(w.write([Put(b"/gpumesh/v1/b", b"1")]), 2)   # at once, not hanging
    finally:
        await w.stop()


async def test_lost_write_read_back_compares_revisions_not_values(etcd_server, etcd_client):  # a clean keyspace
    """The key already held the same value: that is no proof the lost transaction was applied."""
    st = EtcdStore([etcd_server.endpoint])
    await st.connect()
    # a long lease: a 5 s one (refreshed within 1.25 s) lapses on a stalled worker and the store stops writing
    await st.become_leader("cp-rb", ttl=30, wait=10)
    try:
        await st.commit([Put(b"/gpumesh/v1/rb", b"same")])
        real = st.client.kvstub.Txn

        async def lost(*a, **kw):               # the answer is lost, and the transaction was NOT applied
            st.client.kvstub.Txn = real         # (etcd takes the next one: the read-back's barrier)
            raise OSError("connection reset before the answer")
        st.client.kvstub.Txn = lost
        with pytest.raises(errors.Unavailable):
            await st.commit([Put(b"/gpumesh/v1/rb", b"same")])
        assert not st.lost_leadership.is_set()

        async def applied_then_lost(*a, **kw):  # applied, then the answer is lost
            await real(*a, **kw)
            raise OSError("connection reset after the write")
        st.client.kvstub.Txn = applied_then_lost
        rev = await st.commit([Put(b"/gpumesh/v1/rb", b"same"), Put(b"/gpumesh/v1/rb2", b"x")])
        kv = await st.client.get(b"/gpumesh/v1/rb")
        assert rev == kv.mod_revision
    finally:
        await st.revoke_lease(st.session_lease)
        await st.close()


async def test_slow_watcher_is_cut_off_with_resource_exhausted_naming_the_watch():
    hub = EventHub(max_queue=4)
    q = hub.subscribe("SliceService.Watch")
    for i in range(10):
        hub.publish(MODIFIED, types_pb2.Slice(id=f"s-{i}"), i)
    assert q not in hub.subscribers
    # the old hub queued its "fell behind" marker only if the (full) queue had room: the watcher hung
    item = await asyncio.wait_for(q.get(), 2)
    assert not hasattr(item, "slice"), "the cut-off watcher still gets events instead of the marker"
    assert len(q._queue) == 0                               # nothing held for a watcher that is gone
    q2 = hub.subscribe("SliceService.Watch")
    for i in range(10):
        hub.publish(MODIFIED, types_pb2.Slice(id=f"s-{i}"), i)
    with pytest.raises(errors.ResourceExhausted) as e:
        await asyncio.wait_for(q2.next(), 2)
    assert "SliceService.Watch fell behind by 5 events" in e.value.message and "list again" in e.value.message


def _ctl():
    ctl = Controller(store=None)

    class FakeWriter:
        async def write(self, ops, conds=()):
            return 1
    ctl.writer = FakeWriter()
    return ctl


async def test_internal_slice_follower_resyncs_after_falling_behind():
    ctl = _ctl()
    ctl.events.max_queue = 2
    wm = WorkloadManager(ctl)
    wm.workloads["w-1"] = types_pb2.Workload(id="w-1", slice_id="s-1", node="n", state=types_pb2.WORKLOAD_STATE_RUNNING)
    task = asyncio.create_task(wm._follow_slices())
    await asyncio.sleep(0.05)
    # a burst the follower cannot read in time (no await between publishes); the slice is gone meanwhile
    for i in range(20):
        ctl.events.publish(MODIFIED, types_pb2.Slice(id=f"s-other-{i}"), i)
    ctl.events.publish(DELETED, types_pb2.Slice(id="s-1"), 21)
    try:
        for _ in range(100):
            if wm.workloads["w-1"].state == types_pb2.WORKLOAD_STATE_STOPPED:
                break
            await asyncio.sleep(0.05)
        assert wm.workloads["w-1"].state == types_pb2.WORKLOAD_STATE_STOPPED, "the follower stopped silently"
        assert wm.resyncs >= 1
        assert len(ctl.events.subscribers) == 1            # it follows again
    finally:
        task.cancel()


async def test_ready_waiters_of_a_slice_deleted_before_ready_are_removed():
    ctl = _ctl()
    s = types_pb2.Slice(id="s-1", node="n", state=types_pb2.SLICE_STATE_PENDING)
    ctl.fleet.put_slice(s)
    fut = ctl._wait(ctl.ready_waiters, "s-1")
    await ctl.save([], deleted=[ctl.fleet.drop_slice("s-1")])
    assert fut.done() and "s-1" not in ctl.ready_waiters
    # a wait that times out leaves nothing behind either
    ctl.fleet.put_slice(types_pb2.Slice(id="s-2", node="n", state=types_pb2.SLICE_STATE_PENDING,
                                        allocation_id="a-2"))
    with pytest.raises(errors.DeadlineExceeded):
        await ctl._await_ready("a-2", False, 0.05)
    assert not ctl.ready_waiters


def test_outbox_is_bounded_and_ends_the_stream_when_full():
    from mesh.outbox import Outbox
    o = Outbox(limit=3)
    for i in range(10):
        o.put_nowait(i)
    items = [o.get_nowait() for _ in range(o.qsize())]
    assert items == [0, 1, 2, None] and o.overflowed and o.dropped == 7


async def test_control_plane_whose_writer_cannot_restart_is_not_serving_and_steps_down(tmp_path):
    """The whole process: the writer gives up -> health NOT_SERVING, leader key released (a standby can lead)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from controlplane.state import keys as k
    from controlplane.config import ControlPlaneConfig
    from controlplane.server import ControlPlane
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", metrics_listen="", state_dir=str(tmp_path / "cp"), insecure=True,
                             leader_ttl=30)
    cp = ControlPlane(cfg)
    await cp.start()
    try:
        async def broken(ops, conds=()):
            raise RuntimeError("boom: the commit path is broken for good")
        cp.store.commit = broken
        cp.ctl.writer.max_restarts = 2
        for _ in range(3):
            with pytest.raises(errors.Unavailable):
                await asyncio.wait_for(cp.ctl.writer.write([Put(b"/gpumesh/v1/x", b"1")]), 10)
        await asyncio.wait_for(cp.ctl.writer.task, 10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert cp.store.lost_leadership.is_set()        # run_until_signal stops the process on this
        assert await cp.store.client.get(k.LEADER.encode()) is None, "the session lease was not given up"
    finally:
        await cp.stop()


async def test_agent_session_failing_with_any_exception_is_logged_and_reconnected(tmp_path, caplog):
    """Before, only grpc errors were handled: any other exception of a session ended the agent's run loop."""
    from types import SimpleNamespace

    from nodeagent.agent import NodeAgent
    gpus = SimpleNamespace(nvml=None, init=lambda: None)
    agent = NodeAgent("n1", "127.0.0.1:1", gpus, mps_root=str(tmp_path / "mps"), backend="sim", reconnect_max=0.1)
    calls = []

    async def session(stub):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a handler's bug")
        agent.stopping.set()
    agent._session = session
    await asyncio.wait_for(agent.run(), 10)
    assert len(calls) == 2, "the agent did not reconnect after the failure"
    assert any("agent session failed" in r.getMessage() for r in caplog.records)


async def test_control_plane_sync_reader_logs_any_exception_and_ends_the_stream(caplog):
    from controlplane.api.services import NodeService
    from gpumesh.v1 import node_service_pb2 as N
    ctl = _ctl()
    ctl.fleet.upsert_node(types_pb2.Node(name="n1")).ready = True

    async def bug(node, msg):
        raise ValueError("a handler's bug")
    ctl.agent_handlers["workloads"] = bug

    async def requests():
        yield N.AgentMessage(hello=N.SyncHello(node_name="n1"))
        yield N.AgentMessage(workloads=N.WorkloadStatusReport())
        await asyncio.sleep(3600)

    svc = NodeService(ctl, nodes=None, heartbeat_interval=1)
    out = []

    async def consume():
        async for m in svc.Sync(requests(), None):
            out.append(m)
    await asyncio.wait_for(consume(), 10)            # the stream ends (the agent reconnects and resyncs)
    assert any("agent stream reader failed" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


async def test_unnamed_internal_follower_gets_none_when_cut_off_so_it_resubscribes():
    """The mesh release follower (and any unnamed subscriber) resubscribes and sweeps on None: it must get it."""
    hub = EventHub(max_queue=4)
    q = hub.subscribe()
    for i in range(10):
        hub.publish(MODIFIED, types_pb2.Slice(id=f"s-{i}"), i)
    assert await asyncio.wait_for(q.get(), 2) is None     # the old hub never queued it: the follower stopped
    assert q not in hub.subscribers


def test_outbox_is_bounded_in_bytes_too():
    from gpumesh.v1 import node_service_pb2 as N
    from mesh.outbox import Outbox
    o = Outbox(limit=1000, max_bytes=3 * 70_100)
    chunk = N.AgentMessage(log=N.LogChunk(request_id="l-1", data=b"x" * 70_000))
    for _ in range(5):
        o.put_nowait(chunk)
    assert o.qsize() == 4 and o.overflowed           # 3 chunks and the end marker
    for _ in range(3):
        o.get_nowait()
    assert o.bytes == 0 and o.get_nowait() is None


async def test_a_workload_change_etcd_refused_is_made_by_a_resync(monkeypatch):
    """The follower's write (a deleted slice's workload STOPPED) fails once: it resyncs from the fleet and writes
    it then; before, the change was logged and dropped (nothing delivers the slice's deletion again), so the
    workload stayed RUNNING on a slice that no longer existed until the next leader's start."""
    from controlplane.controllers import workloads as wmod
    monkeypatch.setattr(wmod, "SLICE_RETRY_S", 0.01, raising=False)
    ctl = _ctl()
    fail = [1]
    write = ctl.writer.write

    async def flaky(ops, conds=()):
        if fail[0]:
            fail[0] -= 1
            raise errors.Unavailable("etcd: no leader")
        return await write(ops, conds)
    ctl.writer.write = flaky
    wm = WorkloadManager(ctl)
    wm.workloads["w-1"] = types_pb2.Workload(id="w-1", slice_id="s-1", node="n", state=types_pb2.WORKLOAD_STATE_RUNNING)
    task = asyncio.create_task(wm._follow_slices())
    await asyncio.sleep(0.05)
    ctl.events.publish(DELETED, types_pb2.Slice(id="s-1"), 1)
    try:
        for _ in range(100):
            if wm.workloads["w-1"].state == types_pb2.WORKLOAD_STATE_STOPPED:
                break
            await asyncio.sleep(0.02)
        assert wm.workloads["w-1"].state == types_pb2.WORKLOAD_STATE_STOPPED
        assert fail == [0] and wm.resyncs >= 1 and len(ctl.events.subscribers) == 1
    finally:
        task.cancel()
