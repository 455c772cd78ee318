"""A Run on a slice whose write is in flight when a resize of the (idle) slice is planned never lands beside the
resize's commit (controllers/resize.py `_commit_idle_resize`, WorkloadManager.run).

The Run passed its guards (no resize yet) and its record's write went to etcd; the resize was planned meanwhile
(the slice had no workload in memory) and committed: its check looked at the workloads in memory only, which the
Run's record joins once its write is answered. Both landed: the workload's record names the slice on the old
placement, which the resize then released with the process on it. Now a Run is known from its guards until its
write's outcome is: the commit fails while one is in flight (the resize rolls back), and one whose write failed
with an unknown outcome (it may have landed) makes the commit transaction require its record's absence."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migration_phases import P, StepFailed
from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from controlplane.state.store import Absent, Present, Put, Revision
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from gpumesh.v1 import workload_service_pb2 as WS
from mesh import errors
from tests.unit.test_resize_swap_reports import MID, _controller, _slice


def _creates_workload(ops, conds) -> bool:
    """Whether a write is a Run's: a new workload record (a commit requires one absent without writing it)."""
    return any(isinstance(op, Put) and op.key.startswith(keys.workload("")) and Absent(op.key) in conds for op in ops)


class Etcd:
    """The writer's `write` over a dict, checking Absent/Present; a workload's write waits for `go` while `hold`
    is set, and lands but answers UNAVAILABLE (its outcome unknown to the caller) while `lost_answer` is set."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.revs: dict[bytes, int] = {}
        self.rev = 1
        self.hold, self.lost_answer = False, False
        self.workload_waiting, self.go = asyncio.Event(), asyncio.Event()

    async def write(self, ops, conds=()):
        new_workload = _creates_workload(ops, conds)
        if new_workload and self.hold:
            self.workload_waiting.set()
            await self.go.wait()
        await asyncio.sleep(0)
        for c in conds:
            if isinstance(c, Absent) and c.key in self.kv or isinstance(c, Present) and c.key not in self.kv or \
                    isinstance(c, Revision) and self.revs.get(c.key, 0) != c.mod_revision:
                raise errors.Aborted(f"precondition failed on {c.key!r}")
        self.rev += 1
        for op in ops:
            if isinstance(op, Put):
                self.kv[op.key], self.revs[op.key] = op.value, self.rev
            else:
                self.kv.pop(op.key, None)
                self.revs.pop(op.key, None)
        if new_workload and self.lost_answer:
            raise errors.Unavailable("the etcd writer failed; whether this write was applied is unknown")
        return self.rev

    def record(self, key: bytes, msg):
        return msg.FromString(self.kv[key])


def _world():
    etcd = Etcd()
    ctl = _controller({"nA": ["GPU-0", "GPU-1"]})
    ctl.writer.write = etcd.write
    wm = WorkloadManager(ctl)
    mm = MigrationManager(ctl, wm)
    for s in (_slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2)):
        ctl.fleet.put_slice(s)
        etcd.kv[keys.slice_(s.id)] = s.SerializeToString()
    return etcd, ctl, wm, mm


async def _run_held(etcd: Etcd, wm: WorkloadManager, command: str) -> asyncio.Task:
    """A Run on s-x, its record's write held in the writer (`etcd.go` lets it land)."""
    etcd.hold = True
    run = asyncio.create_task(wm.run(WS.RunWorkloadRequest(slice_id="s-x", command=[command])))
    await asyncio.wait_for(etcd.workload_waiting.wait(), 20)
    return run


def _plan(etcd: Etcd, mm: MigrationManager) -> M.Migration:
    """The resize of the idle s-x, planned (its record written) with its reserved slice s-t READY."""
    m = M.Migration(id=MID, tenant="t", source_node="nA", source_slice="s-x", target_node="nA", target_slice="s-t",
                    resize_slice="s-x", reason="resize", phase=P.MIGRATION_PHASE_PLANNED, target_allocated=True)
    mm.migrations[MID] = m
    etcd.kv[keys.migration(MID)] = m.SerializeToString()
    return m


def _unswapped(etcd: Etcd, ctl) -> None:
    assert etcd.record(keys.migration(MID), M.Migration).phase == P.MIGRATION_PHASE_PLANNED
    for x in (ctl.fleet.slices["s-x"], etcd.record(keys.slice_("s-x"), T.Slice)):
        assert (x.device_uuid, x.memory_bytes) == ("GPU-0", 1 << 30)


def test_a_run_whose_write_is_in_flight_fails_the_idle_resize_commit():
    async def main():
        etcd, ctl, wm, mm = _world()
        run = await _run_held(etcd, wm, "train")
        m = _plan(etcd, mm)         # planned now: the slice has no workload in memory yet
        with pytest.raises(StepFailed, match="s-x"):
            await mm._commit_idle_resize(m)
        _unswapped(etcd, ctl)
        etcd.go.set()
        w = await asyncio.wait_for(run, 20)
        assert (w.slice_id, w.node) == ("s-x", "nA") and w.id in wm.workloads
    asyncio.run(main())


def test_a_run_cancelled_with_its_write_queued_still_fails_the_commit():
    """The Run's caller goes away: its write is still in the writer and lands; it is known until it does."""
    async def main():
        etcd, ctl, wm, mm = _world()
        run = await _run_held(etcd, wm, "train")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        m = _plan(etcd, mm)
        with pytest.raises(StepFailed, match="s-x"):
            await mm._commit_idle_resize(m)
        _unswapped(etcd, ctl)
    asyncio.run(main())


def test_a_run_whose_write_landed_unanswered_makes_the_commit_refused_by_etcd():
    async def main():
        etcd, ctl, wm, mm = _world()
        etcd.lost_answer = True
        with pytest.raises(errors.Unavailable):
            await wm.run(WS.RunWorkloadRequest(slice_id="s-x", command=["train"]))
        assert wm.workloads == {}       # in etcd, not in memory
        etcd.lost_answer = False
        m = _plan(etcd, mm)
        with pytest.raises(StepFailed, match="refused"):
            await mm._commit_idle_resize(m)
        _unswapped(etcd, ctl)
    asyncio.run(main())


def test_a_run_whose_write_failed_unanswered_but_did_not_land_lets_the_resize_commit():
    async def main():
        etcd, ctl, wm, mm = _world()
        real = etcd.write

        async def unavailable(ops, conds=()):
            if _creates_workload(ops, conds):
                raise errors.Unavailable("etcd: no leader")
            return await real(ops, conds)
        ctl.writer.write = unavailable
        with pytest.raises(errors.Unavailable):
            await wm.run(WS.RunWorkloadRequest(slice_id="s-x", command=["train"]))
        m = _plan(etcd, mm)
        await mm._commit_idle_resize(m)
        assert etcd.record(keys.migration(MID), M.Migration).phase == P.MIGRATION_PHASE_COMMITTED
        assert etcd.record(keys.slice_("s-x"), T.Slice).device_uuid == "GPU-1"
    asyncio.run(main())


def test_a_run_whose_write_is_in_flight_fails_the_commit_of_a_resize_that_moves_a_workload():
    """The slice runs w-1 (the resize moves it); a second Run on it passed its guards before the resize was planned."""
    async def main():
        etcd, ctl, wm, mm = _world()
        w = T.Workload(id="w-1", tenant="t", node="nA", slice_id="s-x", state=T.WORKLOAD_STATE_RUNNING)
        etcd.kv[keys.workload("w-1")], etcd.revs[keys.workload("w-1")] = w.SerializeToString(), 1
        wm.workloads["w-1"], wm.revisions["w-1"] = w, 1
        run = await _run_held(etcd, wm, "eval")
        m = _plan(etcd, mm)
        m.workload_id, m.session, m.phase = "w-1", f"mig-{MID}", P.MIGRATION_PHASE_PAUSED
        with pytest.raises(StepFailed, match="s-x"):
            await mm._commit(m, M.MigrationReport(migration_id=MID, event=M.MigrationReport.RESTORED, step=3))
        assert etcd.record(keys.migration(MID), M.Migration).phase == P.MIGRATION_PHASE_PLANNED
        assert etcd.record(keys.workload("w-1"), T.Workload).node == "nA"
        etcd.go.set()
        await asyncio.wait_for(run, 20)
    asyncio.run(main())


def test_a_resize_asked_while_a_run_on_the_slice_is_written_is_refused_up_front():
    async def main():
        etcd, ctl, wm, mm = _world()
        x = ctl.fleet.slices["s-x"]
        x.isolation = T.ISOLATION_EXCLUSIVE         # resized by migration
        run = await _run_held(etcd, wm, "train")
        with pytest.raises(errors.FailedPrecondition, match="on slice s-x is starting"):
            await mm.resize("s-x", 2 << 30, 0.0)
        assert mm.migrations == {}
        etcd.go.set()
        await asyncio.wait_for(run, 20)
    asyncio.run(main())


def test_a_resize_by_migration_of_a_slice_running_two_workloads_is_refused_naming_them():
    """A resize by migration moves one workload (the migration's) into the new placement and then releases the
    old one: a second workload on the slice (nothing stops two Runs on one slice) was torn down with it, its
    record left naming a slice whose placement is gone. Refused up front, naming both; nothing planned."""
    async def main():
        etcd, ctl, wm, mm = _world()
        x = ctl.fleet.slices["s-x"]
        x.isolation = T.ISOLATION_EXCLUSIVE         # resized by migration
        ids = []
        for cmd in ("train", "eval"):
            w = await wm.run(WS.RunWorkloadRequest(slice_id="s-x", command=[cmd]))
            wm.workloads[w.id].state = T.WORKLOAD_STATE_RUNNING
            ids.append(w.id)
        with pytest.raises(errors.FailedPrecondition, match=f"{ids[0]}.*{ids[1]}|{ids[1]}.*{ids[0]}") as e:
            await mm.resize("s-x", 2 << 30, 0.0)
        assert "s-x" in str(e.value) and "one" in str(e.value)
        assert mm.migrations == {} and not any(k.startswith(keys.migration("")) for k in etcd.kv)
    asyncio.run(main())
