"""DeleteNode against what happens meanwhile (controlplane/controllers/nodedelete.py): a restore from a checkpoint
taken on the deleted node still runs; a connection or allocation someone else ended while the deletion ran is
skipped, not read as the node gone; cordon, uncordon and drain of a node being deleted are refused, and their
write never erases the marker nor brings back a deleted record. The fleet and the control plane are
test_nodedelete's (the real controllers over a fake etcd that honours preconditions)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migration_phases import C, FINISHED, P, R
from controlplane.state import keys
from gpumesh.v1 import admin_service_pb2
from gpumesh.v1 import mesh_service_pb2 as MS
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit._nodedelete_world import (A, B, Context, Etcd, Refused, check_deleted, connect_a, control_plane, fleet,
                                          migrate, node, quick, slice_, wait_for)

__all__ = ["quick"]     # the autouse fixture: shorter pauses between repeated agent steps


async def test_a_checkpoint_taken_on_a_deleted_node_restores_to_another():
    """A restore reads the checkpoint store and talks only to its target: its source (the node the workload
    last ran on) being deleted does not fail it."""
    etcd = Etcd()
    fleet(etcd)
    free = slice_("s-af", A, "a-free")
    etcd.kv[keys.slice_(free.id)] = free.SerializeToString()
    ck = M.CheckpointInfo(id="ck-1", workload_id="w-b", tenant="t", node=B, path="t/w-b/ck-1", step=7)
    etcd.kv[keys.checkpoint(ck.id)] = ck.SerializeToString()
    etcd.kv[keys.checkpoint_key(ck.id)] = b"k" * 32
    cp = await control_plane(etcd)
    try:
        agent = connect_a(cp)
        agent.ANSWERS = {**agent.ANSWERS, C.START_TARGET: R.TARGET_LISTENING, C.PUSH_CHECKPOINT: R.RESTORED,
                         C.RESUME_TARGET: R.TARGET_RESUMED}
        resp = await cp.deleter.delete(B)
        assert "w-b" in resp.workloads and B not in cp.ctl.fleet.nodes
        m = await cp.mm.restore("ck-1", to_slice="s-af")
        assert m.source_node == B
        await wait_for(lambda: cp.mm.migrations[m.id].phase in FINISHED, "the restore to end")
        done = etcd.get(keys.migration(m.id), M.Migration)
        assert done.phase == P.MIGRATION_PHASE_DONE, done.message
        w = etcd.get(keys.workload("w-b"), T.Workload)
        assert (w.node, w.slice_id, w.state) == (A, "s-af", T.WORKLOAD_STATE_RUNNING)
        asked = list(dict.fromkeys(a for a, mid in agent.got if mid == m.id))     # a step may be sent twice
        assert asked == ["START_TARGET", "PUSH_CHECKPOINT", "RESUME_TARGET"]
    finally:
        await cp.stop()


async def test_a_restore_to_a_node_after_the_deletion_is_told_to_name_a_slice():
    """A target is placed like the workload's slice, which went with its node: only a named slice will do, said
    at once (not a migration that rolls back)."""
    etcd = Etcd()
    fleet(etcd)
    ck = M.CheckpointInfo(id="ck-1", workload_id="w-b", tenant="t", node=B, path="t/w-b/ck-1", step=7)
    etcd.kv[keys.checkpoint(ck.id)] = ck.SerializeToString()
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        await cp.deleter.delete(B)
        with pytest.raises(errors.FailedPrecondition, match="slice s-b2 is gone: name a slice"):
            await cp.mm.restore("ck-1", to_node=A)
        assert not etcd.under(keys.MIGRATIONS)
    finally:
        await cp.stop()


async def test_a_restore_from_a_node_being_deleted_is_not_one_of_its_migrations():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        cp.mm.migrations["m-r"] = M.Migration(id="m-r", workload_id="w-b", source_node=B, target_node=A,
                                              checkpoint_id="ck-1", phase=P.MIGRATION_PHASE_COPYING)
        cp.mm.migrations["m-to-b"] = M.Migration(id="m-to-b", workload_id="w-to-b", source_node=A, target_node=B,
                                                 checkpoint_id="ck-2", phase=P.MIGRATION_PHASE_COPYING)
        assert cp.mm.unfinished_for(B) == ["m-to-b"]
        cp.ctl.deleted_nodes.add(B)
        assert cp.mm._deleted_node("m-r", A, C.PUSH_CHECKPOINT) == ""
        assert cp.mm._deleted_node("m-r", A, C.START_TARGET) == ""
    finally:
        cp.ctl.deleted_nodes.discard(B)
        await cp.stop()


async def test_a_connection_disconnected_meanwhile_is_skipped():
    """Someone else disconnects a connection of the node between the listing and its turn (its tenant; the peer
    node's own deletion): the deletion goes on and finishes, the marker does not stay."""
    etcd = Etcd()
    fleet(etcd)
    c2 = MS.MeshConnection(id="c-2", tenant="t", slice_a="s-b1", slice_b="s-a1", state=MS.MESH_CONNECTION_STATE_READY,
                           a=MS.BufferDescriptor(node=B, buffer_id="bb2"), b=MS.BufferDescriptor(node=A, buffer_id="ba2"))
    etcd.kv[keys.mesh(c2.id)] = c2.SerializeToString()
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        migrate(cp, etcd)
        real = cp.mesh.disconnect

        async def tenant_first(cid, reason="disconnect"):
            if cid == "c-1" and "c-2" in cp.mesh.connections:
                await real("c-2", reason="the tenant's Disconnect")
            return await real(cid, reason=reason)
        cp.mesh.disconnect = tenant_first
        resp = await cp.deleter.delete(B)
        assert list(resp.connections) == ["c-1"]
        check_deleted(etcd)
        assert keys.mesh("c-2") not in etcd.kv and B not in cp.ctl.fleet.nodes and B not in cp.ctl.deleted_nodes
    finally:
        await cp.stop()


async def test_a_notfound_of_a_step_is_retried_while_the_node_is_there():
    """A NotFound from a step (an allocation released and gone meanwhile) is not the node deleted already."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        migrate(cp, etcd)
        real, calls = cp.ctl.end_node_slices, []

        async def once_gone(name, why):
            calls.append(name)
            if len(calls) == 1:
                raise errors.NotFound("no slice or allocation 'a-2'", kind="slice", name="a-2")
            return await real(name, why)
        cp.ctl.end_node_slices = once_gone
        resp = await cp.deleter.delete(B)
        assert len(calls) == 2 and sorted(resp.slices) == ["s-b1", "s-b2", "s-bt"]
        check_deleted(etcd)
        assert B not in cp.ctl.deleted_nodes
    finally:
        await cp.stop()


async def test_an_allocation_released_meanwhile_is_skipped():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        real = cp.ctl.release

        async def gone(ident, wait=True, message=""):
            if ident == "a-2":
                raise errors.NotFound(f"no slice or allocation {ident!r}", kind="slice", name=ident)
            return await real(ident, wait=wait, message=message)
        cp.ctl.release = gone
        slices, allocs = await cp.ctl.end_node_slices(B, f"node {B} deleted")
        assert sorted(slices) == ["s-b1", "s-b2", "s-bt"] and not cp.ctl.fleet.slices_on(B)
    finally:
        await cp.stop()


async def test_cordon_uncordon_and_drain_of_a_node_being_deleted_are_refused():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        etcd.fail.add(keys.SLICES.encode())       # the deletion cannot finish for now
        cp.deleter.answer_wait = 0.2
        with pytest.raises(errors.Unavailable):
            await cp.deleter.delete(B)
        for call in (cp.admin.CordonNode(admin_service_pb2.CordonNodeRequest(name=B), Context()),
                     cp.admin.UncordonNode(admin_service_pb2.UncordonNodeRequest(name=B), Context()),
                     cp.admin.DrainNode(admin_service_pb2.DrainNodeRequest(name=B), Context())):
            with pytest.raises(Refused) as e:
                await call
            assert e.value.args == (errors.FailedPrecondition.code, f"node {B} is being deleted (meshctl delete "
                                    f"node): it can no longer be cordoned, uncordoned or drained")
        rec = etcd.get(keys.node(B), T.Node)
        assert rec.deleting and not rec.cordoned and cp.ctl.fleet.nodes[B].record.deleting
        etcd.fail.clear()
        await cp.deleter.delete(B)
        assert keys.node(B) not in etcd.kv
    finally:
        await cp.stop()


async def test_a_cordon_writing_when_the_deletion_begins_keeps_the_marker():
    """The cordon's copy of the record (without `deleting`) is in the writer when the marker is asked for: it
    lands first, and the marker is written on top of it (not the other way round)."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        gate, held = asyncio.Event(), asyncio.Event()

        async def slow_first(ops, conds=()):
            if not held.is_set() and any(o.key == keys.node(B) for o in ops):
                held.set()
                await gate.wait()
            return await etcd.write(ops, conds)
        cp.ctl.writer.write = slow_first
        cordon = asyncio.create_task(cp.nodes.set_cordon(B, True))
        await wait_for(held.is_set, "the cordon's write")
        mark = asyncio.create_task(cp.deleter._mark(B, cp.ctl.fleet.nodes[B]))
        await asyncio.sleep(0.05)
        gate.set()
        await cordon
        await mark
        rec = etcd.get(keys.node(B), T.Node)
        assert rec.deleting and rec.cordoned
        assert cp.ctl.fleet.nodes[B].record.deleting and cp.ctl.fleet.nodes[B].record.cordoned
    finally:
        cp.ctl.deleted_nodes.discard(B)
        await cp.stop()


async def test_a_cordon_never_brings_back_a_deleted_record():
    """The record went from etcd (the deletion's last transaction) while this process still has the node: the
    cordon's write, guarded by the key's presence, writes nothing."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        del etcd.kv[keys.node(B)]
        with pytest.raises(errors.NotFound, match=f"no node '{B}'"):
            await cp.nodes.set_cordon(B, True)
        assert keys.node(B) not in etcd.kv and not cp.ctl.fleet.nodes[B].record.cordoned
    finally:
        await cp.stop()


async def test_concurrent_deletes_wait_for_the_one_marker():
    """A second DeleteNode while the first one's marker is being written does not start the steps before it is
    durable, and answers what the first one ended."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        gate = asyncio.Event()
        started = []
        real_write, real_finish = cp.ctl.writer.write, cp.deleter.finish

        async def slow_marker(ops, conds=()):
            if any(o.key == keys.node(B) and T.Node.FromString(o.value).deleting for o in ops if hasattr(o, "value")):
                await gate.wait()
            return await real_write(ops, conds)

        async def finish(name):
            started.append(etcd.get(keys.node(name), T.Node).deleting)
            return await real_finish(name)
        cp.ctl.writer.write, cp.deleter.finish = slow_marker, finish
        first = asyncio.create_task(cp.deleter.delete(B))
        await wait_for(lambda: B in cp.ctl.deleted_nodes, "the first marker")
        second = asyncio.create_task(cp.deleter.delete(B))
        await asyncio.sleep(0.05)
        assert not started
        gate.set()
        a, b = await first, await second
        assert started == [True] and sorted(a.slices) == sorted(b.slices) == ["s-b1", "s-b2", "s-bt"]
    finally:
        await cp.stop()


async def test_a_node_registered_after_its_deletion_can_be_cordoned():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        await cp.deleter.delete(B)
        await cp.nodes.register(B, node(B).inventory, "agent/2")
        assert (await cp.nodes.set_cordon(B, True)).cordoned and etcd.get(keys.node(B), T.Node).cordoned
    finally:
        await cp.stop()
