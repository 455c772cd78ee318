"""DeleteNode (controlplane/controllers/nodedelete.py): a NotReady node is retired for good, everything on it
ended through the controllers' own paths; a READY, unknown or badly named node is refused; a control plane
that stops in the middle of a deletion finishes it when it starts again from what etcd holds.

The control plane here is the real one (slice controller, node manager, workload, mesh and migration managers)
over a fake etcd that honours the writes' preconditions and can fail the writes touching a key prefix (an etcd
member away: UNAVAILABLE, nothing applied). Agents are fakes on real sessions: the live node's answers the
migration commands.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace as NS

import pytest

from controlplane.api.events import DELETED, MODIFIED
from controlplane.controllers import migrations
from controlplane.controllers.migration_phases import C, P, R
from controlplane.serving import observe
from controlplane.serving import reconcile as rc
from controlplane.serving.deployments import DeploymentManager
from controlplane.state import keys
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit._nodedelete_world import (A, B, AgentA, Etcd, Refused, check_deleted, connect_a, control_plane,  # noqa: F401
                                          delete_rpc, drain, fleet, migrate, node, quick, wait_for, workload)


async def test_a_notready_node_is_deleted_and_everything_on_it_ends():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        agent = connect_a(cp)
        migrate(cp, etcd)
        dm = DeploymentManager(cp.ctl, cp.wm, registry=NS())     # its loop not started: each pass by hand below
        dm.store.replicas["chat"] = {
            "r-1": D.Replica(id="r-1", deployment="chat", node=B, slice_id="s-b2", allocation_id="a-2",
                             workload_id="w-b", state=D.REPLICA_STATE_READY),
            "r-2": D.Replica(id="r-2", deployment="chat", node=A, slice_id="s-a2", allocation_id="a-3",
                             workload_id="w-a", state=D.REPLICA_STATE_READY)}
        dm.down_since[B] = 0.0
        watch = cp.ctl.events.subscribe("test")
        resp = await delete_rpc(cp, B)
        assert sorted(resp.slices) == ["s-b1", "s-b2", "s-bt"]
        assert sorted(resp.allocations) == ["a-2", "a-5", "a-gang"]
        assert sorted(resp.workloads) == ["w-b", "w-from-b"]
        assert sorted(resp.migrations) == ["m-from-b", "m-to-b"]
        assert list(resp.connections) == ["c-1"] and list(resp.replicas) == ["chat/r-1"]
        assert resp.node.name == B and resp.node.deleting and resp.node.state == T.NODE_STATE_NOT_READY
        check_deleted(etcd)
        assert B not in cp.ctl.fleet.nodes and B not in cp.ctl.deleted_nodes and not cp.ctl.fleet.slices_on(B)
        assert dm._kick.is_set() and B not in dm.down_since
        # the replica on B is lost at once (its slice is gone), not after deployment_node_lost_seconds
        plan = rc.reconcile(rc.Desired(replicas=2), [observe.replica(dm, r) for r in dm.store.replicas_of("chat")],
                            time.time(), dm.policy)
        assert ("remove", "r-1") in plan.kinds() and any(a.kind == "create" and a.count == 1 for a in plan.actions)
        assert ("remove", "r-2") not in plan.kinds()
        assert ("ABORT_SOURCE", "m-to-b") in agent.got and ("STOP_TARGET", "m-from-b") in agent.got
        assert ("Node", B, "NodeDeleted") in [e[:3] for e in cp.ctl.recorder.events]
        seen = {}
        for ev in drain(watch):
            seen.setdefault(ev.slice.id, []).append((ev.type, ev.slice.message))
        assert seen["s-b2"] == [(MODIFIED, f"node {B} deleted"), (DELETED, f"node {B} deleted")]
        # a retry: the node is gone
        with pytest.raises(Refused) as e:
            await delete_rpc(cp, B)
        assert e.value.args[0] == errors.NotFound.code
        # its agent comes back: a new node, sent nothing of the old one; its reports change nothing
        reg = await cp.nodes.register(B, node(B).inventory, "agent/2")
        assert reg.state == T.NODE_STATE_READY and not reg.deleting and reg.slices == 0
        assert cp.wm.desired_on(B) == []
        session = cp.ctl.sessions.open(B)
        await cp.wm._report(B, node_service_pb2.WorkloadStatusReport(full=True, workloads=[
            T.Workload(id="w-b", node=B, state=T.WORKLOAD_STATE_STOPPED)]))
        w = cp.wm.workloads["w-b"]
        assert (w.state, w.message) == (T.WORKLOAD_STATE_FAILED, f"node {B} deleted")
        forget = [m for m in drain(session.outbox) if m.WhichOneof("kind") == "workloads"]
        assert forget and list(forget[-1].workloads.forget) == ["w-b"]          # its files go on the host
        await cp.ctl.report(B, True, [node_service_pb2.SliceStatus(slice_id="s-b2", state=T.SLICE_STATE_READY)], [])
        assert "s-b2" not in cp.ctl.fleet.slices                                   # no zombie slice
    finally:
        await cp.stop()


@pytest.mark.parametrize("name,code", [
    ("", errors.InvalidArgument), ("Node_B", errors.InvalidArgument), ("x" * 64, errors.InvalidArgument),
    ("node-z", errors.NotFound), (A, errors.FailedPrecondition)])
async def test_refused(name, code):
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        before = dict(etcd.kv)
        with pytest.raises(Refused) as e:
            await delete_rpc(cp, name)
        status, details = e.value.args
        assert status == code.code and etcd.kv == before
        if code is errors.InvalidArgument:
            assert details.startswith("name")
        if code is errors.FailedPrecondition:
            assert A in details and "drain it and stop its agent first" in details
    finally:
        await cp.stop()


async def test_an_agent_that_registered_just_before_the_marker_wins():
    """The marker is written only while the node holds no lease (a guard in the same transaction)."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        etcd.kv[keys.alive(B)] = B.encode()         # registered in etcd; this leader has not seen it yet
        with pytest.raises(errors.FailedPrecondition, match="registered again"):
            await cp.deleter.delete(B)
        assert not etcd.get(keys.node(B), T.Node).deleting and B not in cp.ctl.deleted_nodes
    finally:
        await cp.stop()


async def test_a_node_being_deleted_cannot_register():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        migrate(cp, etcd)
        etcd.fail.add(keys.SLICES.encode())       # the deletion cannot finish for now
        cp.deleter.answer_wait = 0.2
        with pytest.raises(errors.Unavailable, match="goes on in the background"):
            await cp.deleter.delete(B)
        with pytest.raises(errors.FailedPrecondition, match="being deleted"):
            await cp.nodes.register(B, node(B).inventory, "agent/2")
        etcd.fail.clear()
        resp = await cp.deleter.delete(B)           # the retried call joins the deletion and answers
        assert sorted(resp.slices) == ["s-b1", "s-b2", "s-bt"]
        check_deleted(etcd)
    finally:
        await cp.stop()


async def test_a_register_that_was_granted_its_lease_while_the_marker_was_written_is_refused():
    """Register awaits etcd for a lease; a deletion that began meanwhile wins (its write would bring the node
    back READY, half-deleted)."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        granted = asyncio.Event()

        async def slow_grant(ttl):
            await granted.wait()
            return 7
        etcd.grant_lease = slow_grant
        registering = asyncio.create_task(cp.nodes.register(B, node(B).inventory, "agent/1"))
        await asyncio.sleep(0.05)
        await cp.deleter._mark(B, cp.ctl.fleet.nodes[B])
        granted.set()
        with pytest.raises(errors.FailedPrecondition, match="being deleted"):
            await registering
        assert keys.alive(B) not in etcd.kv and etcd.get(keys.node(B), T.Node).deleting
    finally:
        await cp.stop()


@pytest.mark.parametrize("fails", [keys.WORKLOADS, keys.MESH, keys.SLICES, keys.MIGRATIONS, keys.NODES])
async def test_a_control_plane_stopped_mid_deletion_finishes_it_at_start(fails):
    """The first leader stops (as in a crash) while a write of one step keeps failing; the next leader, loaded
    from etcd, finds the marker and finishes the deletion."""
    etcd = Etcd()
    fleet(etcd)
    first = await control_plane(etcd)
    connect_a(first)
    migrate(first, etcd)
    first.deleter.answer_wait = 0.3
    etcd.fail.add(fails.encode() if fails != keys.NODES else keys.node(B))
    if fails == keys.NODES:
        etcd.fail.add(keys.GPU_HEALTH.encode())     # the marker is written; the last transaction is not
        first.deleter._mark = _mark_unguarded(first.deleter, etcd)
    with pytest.raises(errors.Unavailable):
        await first.deleter.delete(B)
    await first.stop()                              # the crash: nothing of its memory survives
    assert etcd.get(keys.node(B), T.Node).deleting
    etcd.fail.clear()
    second = await control_plane(etcd)
    try:
        connect_a(second)
        assert B in second.ctl.deleted_nodes
        with pytest.raises(errors.FailedPrecondition):
            await second.nodes.register(B, node(B).inventory, "agent/2")
        await wait_for(lambda: keys.node(B) not in etcd.kv, "the deletion to finish")
        await wait_for(lambda: all(etcd.get(keys.migration(m), M.Migration).phase in migrations.FINISHED
                                   for m in ("m-from-b", "m-to-b")), "the migrations to end")
        check_deleted(etcd)
        assert B not in second.ctl.fleet.nodes and B not in second.ctl.deleted_nodes
        assert ("Node", B, "NodeDeleted") in [e[:3] for e in second.ctl.recorder.events]
    finally:
        await second.stop()


def _mark_unguarded(deleter, etcd):
    """The marker's own write goes through although node keys fail (to fail only the last transaction)."""
    real = deleter._mark

    async def mark(name, entry):
        etcd.fail.discard(keys.node(B))
        try:
            await real(name, entry)
        finally:
            etcd.fail.add(keys.node(B))
    return mark


async def test_a_migration_committed_to_the_deleted_node_finishes_with_the_workload_failed():
    etcd = Etcd()
    fleet(etcd)
    w = etcd.get(keys.workload("w-to-b"), T.Workload)
    w.node, w.slice_id = B, "s-bt"                  # the commit moved the record to the target, on B
    etcd.kv[keys.workload(w.id)] = w.SerializeToString()
    cp = await control_plane(etcd)
    try:
        ConnectedA = connect_a(cp)
        ConnectedA.ANSWERS = {**AgentA.ANSWERS, C.STOP_SOURCE: R.SOURCE_STOPPED}
        m = M.Migration(id="m-to-b", workload_id="w-to-b", tenant="t", source_node=A, source_slice="s-a3",
                        target_node=B, target_slice="s-bt", target_allocated=True, session="mig-m-to-b",
                        phase=P.MIGRATION_PHASE_COMMITTED)
        etcd.kv[keys.migration(m.id)] = m.SerializeToString()
        cp.mm.migrations[m.id] = m
        cp.mm._spawn(m.id)
        resp = await cp.deleter.delete(B)
        assert list(resp.migrations) == ["m-to-b"] and "w-to-b" in resp.workloads
        done = etcd.get(keys.migration("m-to-b"), M.Migration)
        assert done.phase == P.MIGRATION_PHASE_DONE and "ended before it ran" in done.message
        assert ("STOP_SOURCE", "m-to-b") in ConnectedA.got
    finally:
        await cp.stop()



async def test_the_health_recovery_of_the_deleted_node_s_gpus_ends_with_it():
    """A GPU of B marked unhealthy: the health controller moves its workload off (a task waiting for the move)
    before it asks the reset. B deleted, that task went on (next it tried B itself and recorded events on a
    node that no longer exists) and B's GPU records stayed; now they end with the node, A's go on."""
    from controlplane.controllers.telemetry import Policy, TelemetryManager
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    tm = TelemetryManager(cp.ctl, Policy(), clock=time.time)
    never = asyncio.Event()
    moving: list[str] = []

    async def migrate(wid, to_node="", to_slice="", mode=0, reason="migrate"):
        moving.append(wid)
        await never.wait()                 # the move of the workload is under way

    cp.mm.migrate = migrate
    try:
        connect_a(cp)
        ga, gb = cp.ctl.fleet.gpu(A, 1), cp.ctl.fleet.gpu(B, 1)     # w-a on s-a2, w-b on s-b2
        wb = cp.wm.workloads["w-b"]
        was, wb.state = wb.state, T.WORKLOAD_STATE_RUNNING    # marked while B was still up (now B is NotReady)
        for g in (ga, gb):
            tm.health._migrate_off(g, tm.health.rec(g))
        wb.state = was
        await wait_for(lambda: sorted(moving) == ["w-a", "w-b", "w-to-b"], "the health migrations to start")
        tasks = {t.get_name(): t for t in tm.health.tasks}
        await delete_rpc(cp, B)
        await wait_for(lambda: tasks["health-migrate-w-b"].done(), "B's health migration to end")
        assert tasks["health-migrate-w-b"].cancelled()
        assert not tasks["health-migrate-w-a"].done() and not tasks["health-migrate-w-to-b"].done()
        assert [k for k in tm.health.gpus if k[0] == B] == [] and (A, 1) in tm.health.gpus
        assert set(tm.health.task_nodes.values()) == {A} and B not in tm.events
    finally:
        never.set()                 # (the moves' planning runs to its end even when its task is cancelled)
        for t in list(tm.health.tasks):
            t.cancel()
        await cp.stop()
