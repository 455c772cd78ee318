"""A commit write that landed though its caller was told it failed without a verdict (the writer's "whether this
write was applied is unknown: read the object back before retrying", controlplane/state/writer.py) is found in
etcd and finished, never rolled back over.

Its retry, the same transaction, fails its precondition on the workload's record (the first write moved it), the
record read back names the target, and the commit was computed again from it: "the source changed while copying",
so ROLLING_BACK was written over the COMMITTED record, the target stopped and the source resumed while the
workload's record in etcd named the target: the source's node then stopped it as no longer its own.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import P
from controlplane.state import keys
from controlplane.state.store import Absent, Revision
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from tests.unit._workloads_standin import workloads_standin
from tests.unit.test_migration_durability import CROSS_NODE, MID, WID, Agent, migration, running_on_source, start, \
    wait_for


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeats (the product's are seconds); nothing here depends on timing."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)


class Etcd:
    """Keys with mod revisions and checked preconditions; `lose_answer`: the next write touching the key is
    applied and its caller told UNAVAILABLE (outcome unknown)."""

    def __init__(self) -> None:
        self.kv: dict = {}          # key -> (value, mod revision)
        self.rev = 1
        self.lose_answer: set = set()

    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        for c in conds:
            have = self.kv.get(c.key)
            if isinstance(c, Absent) and have is not None or isinstance(c, Revision) and (
                    (have[1] if have else 0) != c.mod_revision) or not isinstance(c, (Absent, Revision)) and have is None:
                raise errors.Aborted("a precondition of the write failed (concurrent change)")
        self.rev += 1
        for o in ops:
            if hasattr(o, "value"):
                self.kv[o.key] = (o.value, self.rev)
            else:
                self.kv.pop(o.key, None)
        lost = [k for k in self.lose_answer if any(o.key == k for o in ops)]
        if lost:
            self.lose_answer.difference_update(lost)
            raise errors.Unavailable("the etcd writer failed (RuntimeError: boom); whether this write was applied is "
                                     "unknown: read the object back before retrying")
        return self.rev

    async def read(self, key):
        return self.kv.get(key)

    def value(self, key, cls):
        got = self.kv.get(key)
        return cls.FromString(got[0]) if got else None


def test_a_commit_that_landed_with_its_answer_lost_is_finished_not_rolled_back():
    async def main():
        etcd = Etcd()
        w = running_on_source()
        etcd.kv[keys.workload(WID)] = (w.SerializeToString(), 1)
        sessions: dict = {}
        target = types_pb2.Slice(id="s-b", node="nB", state=types_pb2.SLICE_STATE_READY)
        ctl = types.SimpleNamespace(agent_handlers={}, release_hooks=[], sessions=sessions,
                                    fleet=types.SimpleNamespace(slices={"s-b": target}), swapping={},
                                    writer=types.SimpleNamespace(write=etcd.write), store=etcd,
                                    recorder=types.SimpleNamespace(emit=lambda *a, **k: None))
        wm = workloads_standin({WID: w}, {WID: 1})

        async def refresh(wid: str) -> int:     # workloadrecords.refresh: etcd's record adopted when newer
            value, rev = etcd.kv[keys.workload(wid)]
            if rev > wm.revisions.get(wid, 0):
                wm.workloads[wid], wm.revisions[wid] = types_pb2.Workload.FromString(value), rev
            return rev
        wm.refresh = refresh
        mm = migrations.MigrationManager(ctl, wm)
        m = migration(types.SimpleNamespace(kv={}), P.MIGRATION_PHASE_PAUSED)
        etcd.kv[keys.migration(MID)] = (m.SerializeToString(), 1)
        etcd.lose_answer.add(keys.workload(WID))           # the commit's transaction: applied, answer lost
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        a.etcd = b.etcd = types.SimpleNamespace(migration=lambda: etcd.value(keys.migration(MID), M.Migration),
                                                workload=lambda: etcd.value(keys.workload(WID), types_pb2.Workload))
        sessions.update(nA=a, nB=b)
        start(mm, m)
        await wait_for(lambda: mm.migrations[MID].phase in (P.MIGRATION_PHASE_DONE, P.MIGRATION_PHASE_ABORTED),
                       "the migration's end")
        assert etcd.value(keys.workload(WID), types_pb2.Workload).node == "nB"
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE, mm.migrations[MID].message
        assert etcd.value(keys.migration(MID), M.Migration).phase == P.MIGRATION_PHASE_DONE
        assert "RESUME_TARGET" in b.actions() and "STOP_SOURCE" in a.actions()
        assert "STOP_TARGET" not in b.actions() and "ABORT_SOURCE" not in a.actions()
        assert wm.workloads[WID].node == "nB"
    asyncio.run(main())


def test_a_resize_commit_that_landed_with_its_answer_lost_is_adopted_with_the_swapped_slices():
    """A resize to another node: the fleet was put back as before the swap when the write seemed to fail; the
    commit found in etcd brings the swapped records back with it."""
    from tests.unit.test_resize_swap_reports import _controller, _slice

    async def main():
        etcd = Etcd()
        ctl = _controller({"nA": ["GPU-0"], "nB": ["GPU-1"]})
        ctl.writer.write, ctl.store = etcd.write, etcd
        x, t = _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nB", 0, "GPU-1", 2)
        w = types_pb2.Workload(id=WID, node="nA", slice_id="s-x", state=types_pb2.WORKLOAD_STATE_RUNNING)
        for key, value in ((keys.slice_("s-x"), x), (keys.slice_("s-t"), t), (keys.workload(WID), w)):
            etcd.kv[key] = (value.SerializeToString(), 1)
        for s in (x, t):
            ctl.fleet.put_slice(s, 1)
        wm = workloads_standin({WID: w}, {WID: 1})

        async def refresh(wid: str) -> int:
            value, rev = etcd.kv[keys.workload(wid)]
            if rev > wm.revisions.get(wid, 0):
                wm.workloads[wid], wm.revisions[wid] = types_pb2.Workload.FromString(value), rev
            return rev
        wm.refresh = refresh
        mm = migrations.MigrationManager(ctl, wm)
        m = M.Migration(id=MID, workload_id=WID, source_node="nA", source_slice="s-x", target_node="nB",
                        target_slice="s-t", resize_slice="s-x", session=f"mig-{MID}", phase=P.MIGRATION_PHASE_PAUSED)
        mm.migrations[MID] = m
        etcd.kv[keys.migration(MID)] = (m.SerializeToString(), 1)
        etcd.lose_answer.add(keys.migration(MID))
        await mm._commit(m, M.MigrationReport(migration_id=MID, event=M.MigrationReport.RESTORED, step=3))
        assert m.phase == P.MIGRATION_PHASE_COMMITTED
        assert etcd.value(keys.migration(MID), M.Migration).phase == P.MIGRATION_PHASE_COMMITTED
        assert (wm.workloads[WID].node, wm.workloads[WID].slice_id) == ("nB", "s-x")
        for sid, node, device in (("s-x", "nB", "GPU-1"), ("s-t", "nA", "GPU-0")):
            s = ctl.fleet.slices[sid]
            assert (s.node, s.device_uuid) == (node, device), s
            assert etcd.value(keys.slice_(sid), types_pb2.Slice).node == node
    asyncio.run(main())
