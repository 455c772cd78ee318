"""One workload, one unfinished migration: two Migrate (or Restore) calls for the same workload, the second asked
while the first one's record is being written, never both plan a migration (two targets, two copies)."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers import migrations
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from tests.unit.test_migration_durability import WID, Etcd, manager, running_on_source


class SlowEtcd(Etcd):
    async def write(self, ops, conds=()):
        await asyncio.sleep(0.05)          # a group commit: other requests run meanwhile
        return await super().write(ops, conds)


def quiet(mm) -> None:
    mm._spawn = lambda mid: None           # the state machine is not what this checks

    async def sdk_answers(w, what="migration"):
        await asyncio.sleep(0)             # the source agent's SDK probe: answered, after a turn of the loop
    mm.check_sdk = sdk_answers


@pytest.mark.asyncio
async def test_two_migrates_of_one_workload_plan_one_migration():
    etcd = SlowEtcd()
    mm, _, wm = manager(etcd, running_on_source())
    wm.get = lambda wid: wm.workloads[wid]
    quiet(mm)
    got = await asyncio.gather(mm.migrate(WID), mm.migrate(WID), return_exceptions=True)
    planned = [g for g in got if isinstance(g, M.Migration)]
    refused = [g for g in got if isinstance(g, errors.FailedPrecondition)]
    assert len(planned) == 1 and len(refused) == 1, got
    assert "migrating already" in str(refused[0])
    assert [m.id for m in mm.migrations.values()] == [planned[0].id]
    assert mm.planning == {}


@pytest.mark.asyncio
async def test_a_failed_first_write_leaves_the_workload_free():
    etcd = SlowEtcd()
    mm, _, wm = manager(etcd, running_on_source())
    wm.get = lambda wid: wm.workloads[wid]
    quiet(mm)

    async def refuse(ops, conds=()):
        raise errors.Unavailable("etcd member restarting")
    mm.ctl.writer.write = refuse
    with pytest.raises(errors.Unavailable):
        await mm.migrate(WID)
    assert mm.active_for(WID) is None and mm.planning == {}
    mm.ctl.writer.write = etcd.write
    assert (await mm.migrate(WID)).workload_id == WID


@pytest.mark.asyncio
async def test_two_restores_of_one_checkpoint_plan_one_migration():
    etcd = SlowEtcd()
    w = running_on_source()
    w.state = types_pb2.WORKLOAD_STATE_STOPPED
    mm, _, wm = manager(etcd, w)
    wm.get = lambda wid: wm.workloads[wid]
    mm.ctl.fleet.slices["s-a"] = types_pb2.Slice(id="s-a", node="nA")
    mm.checkpoints["ck-1"] = M.CheckpointInfo(id="ck-1", workload_id=WID, node="nA")
    quiet(mm)
    got = await asyncio.gather(mm.restore("ck-1"), mm.restore("ck-1"), return_exceptions=True)
    planned = [g for g in got if isinstance(g, M.Migration)]
    assert len(planned) == 1, got
    assert isinstance([g for g in got if g not in planned][0], errors.FailedPrecondition)
    assert len(mm.migrations) == 1


def test_unfinished_lists_planned_and_unfinished_only():
    mm, _, _ = manager(Etcd(), running_on_source())
    mm.migrations["m-done"] = M.Migration(id="m-done", workload_id=WID, phase=M.MIGRATION_PHASE_DONE)
    with mm._planned(M.Migration(id="m-new", workload_id=WID)):
        assert [m.id for m in mm.unfinished()] == ["m-new"]
    assert list(mm.unfinished()) == []
    assert migrations.MigrationManager.active_for(mm, WID) is None


@pytest.mark.parametrize("wid, says", [("", "workload_id: is required"), ("w\n1", "workload_id: is not a valid ID")])
async def test_migrate_and_checkpoint_name_the_workload_id_field(wid, says):
    """INVALID_ARGUMENT naming `workload_id`, the request's field (the workload manager's check said `id`)."""
    from controlplane.controllers.workloads import WorkloadManager
    from controlplane.controllers.slices import Controller
    mm, _, _ = manager(Etcd(), None)
    mm.wm = WorkloadManager(Controller(store=None))
    for call in (mm.migrate(wid), mm.checkpoint(wid)):
        with pytest.raises(errors.InvalidArgument) as e:
            await call
        assert says in str(e.value)


async def test_resize_and_restore_name_their_missing_id():
    """An empty slice_id or checkpoint_id is INVALID_ARGUMENT naming it (it was NOT_FOUND "no slice ''")."""
    mm, _, _ = manager(Etcd(), None)
    with pytest.raises(errors.InvalidArgument, match="slice_id: is required"):
        await mm.resize("", 1 << 30, 0.0)
    with pytest.raises(errors.InvalidArgument, match="checkpoint_id: is required"):
        await mm.restore("")


async def test_a_resize_whose_caller_goes_away_is_still_driven():
    """The Resize call is cancelled (its client gone) while the new slice is being made: the resize's state
    machine is started all the same; before, the migration stayed PLANNED and undriven, and the slice (and the
    reserved one) could not be resized or moved until a control-plane restart."""
    etcd = SlowEtcd()
    mm, _, wm = manager(etcd, None)
    s = types_pb2.Slice(id="s-a", node="nA", gpu_index=0, gpu_model="H100-80GB", isolation=types_pb2.ISOLATION_MIG,
                        profile="1g.10gb", memory_bytes=10 << 30, tenant="t", state=types_pb2.SLICE_STATE_READY)
    mm.ctl.fleet.slices["s-a"] = s
    mm.ctl.fleet.gpu = lambda node, index: None
    ready = asyncio.Event()

    async def allocate(req, no_wait=False):
        return "a-new", [types_pb2.Slice(id="s-new", node="nA", gpu_index=0)]

    async def await_ready(alloc_id, no_wait, timeout):
        await ready.wait()
    mm.ctl.allocate, mm.ctl._await_ready = allocate, await_ready
    spawned = []
    mm._spawn = spawned.append
    call = asyncio.ensure_future(mm.resize("s-a", 0, 0.0, mig_profile="2g.20gb"))
    await asyncio.sleep(0.3)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    ready.set()
    await asyncio.sleep(0.2)
    (m,) = mm.migrations.values()
    assert spawned == [m.id] and m.target_slice == "s-new"
