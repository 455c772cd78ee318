"""A migration never acts on a phase etcd does not hold, and a rollback ends only with the source running.

The MigrationManager runs against fakes: an etcd writer that can fail a write (an etcd member restarting:
UNAVAILABLE, nothing applied) or refuse it (a precondition: ABORTED), and agent sessions that answer the
migration commands, or are away and come back. Each agent command records what etcd held when it was sent,
so a test can assert that the target was told to run only after the commit was durable.
"""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import C, P, R
from controlplane.state import keys
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from tests.unit._workloads_standin import workloads_standin

WID, MID = "w-1", "m-1"


class Etcd:
    """The fake writer: a dict of keys, with failures to inject for writes that touch a key."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}
        self.fail: list[tuple[str, Exception]] = []      # (key the write touches, error), used once each

    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        for i, (key, exc) in enumerate(self.fail):
            if any(o.key == key for o in ops):
                del self.fail[i]
                raise exc
        for o in ops:
            if hasattr(o, "value"):
                self.kv[o.key] = o.value
            else:
                self.kv.pop(o.key, None)
        return 1

    def migration(self) -> M.Migration | None:
        v = self.kv.get(keys.migration(MID))
        return M.Migration.FromString(v) if v is not None else None

    def workload(self) -> types_pb2.Workload | None:
        v = self.kv.get(keys.workload(WID))
        return types_pb2.Workload.FromString(v) if v is not None else None


class Agent:
    """A node agent's session: answers each command with `answers[action]` (a list: one answer per ask, the
    last repeated) and notes what etcd held when the command came."""

    def __init__(self, node: str, mm, etcd: Etcd, answers: dict) -> None:
        self.node, self.mm, self.etcd, self.answers = node, mm, etcd, answers
        self.got: list[tuple[str, int | None, str]] = []     # (action, etcd phase, etcd workload node)

    def send(self, msg) -> None:
        a = msg.migration.action
        m, w = self.etcd.migration(), self.etcd.workload()
        self.got.append((C.Action.Name(a), m.phase if m else None, w.node if w else ""))
        seq = self.answers.get(a)
        if not seq:
            return
        event = seq.pop(0) if len(seq) > 1 else seq[0]
        rep = M.MigrationReport(migration_id=msg.migration.migration_id, event=event, message="fake failure"
                                if event == R.FAILED else "")
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.mm._on_report(self.node, rep)))

    def actions(self) -> list[str]:
        return [a for a, _, _ in self.got]


def manager(etcd: Etcd, workload: types_pb2.Workload | None):
    sessions: dict = {}
    # the target slice the migrations here name, READY (a commit onto a released one rolls back)
    target = types_pb2.Slice(id="s-b", node="nB", state=types_pb2.SLICE_STATE_READY)
    ctl = types.SimpleNamespace(agent_handlers={}, release_hooks=[], sessions=sessions,
                                fleet=types.SimpleNamespace(slices={"s-b": target}),
                                swapping={},
                                writer=types.SimpleNamespace(write=etcd.write),
                                recorder=types.SimpleNamespace(emit=lambda *a, **k: None))
    wm = workloads_standin({WID: workload} if workload else {})

    async def refresh(wid: str) -> int:     # etcd's record is the one in memory: a refusal was not its change
        return wm.revisions.get(wid, 0)
    wm.refresh = refresh
    if workload is not None:
        etcd.kv[keys.workload(WID)] = workload.SerializeToString()
    return migrations.MigrationManager(ctl, wm), sessions, wm


def migration(etcd: Etcd, phase: int, **fields) -> M.Migration:
    m = M.Migration(id=MID, workload_id=WID, source_node="nA", source_slice="s-a", target_node="nB",
                    target_slice="s-b", session=f"mig-{MID}", target_address="10.0.0.2:1", phase=phase, **fields)
    etcd.kv[keys.migration(MID)] = m.SerializeToString()
    return m


def running_on_source() -> types_pb2.Workload:
    return types_pb2.Workload(id=WID, node="nA", slice_id="s-a", state=types_pb2.WORKLOAD_STATE_RUNNING)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeats (the product's are seconds); nothing here depends on timing."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)


async def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def start(mm, m: M.Migration) -> None:
    mm.migrations[m.id] = m
    mm.secrets[m.id] = b"x" * 32
    mm._spawn(m.id)


CROSS_NODE = {C.SEND: [R.RESTORED], C.RESUME_TARGET: [R.TARGET_RESUMED], C.STOP_SOURCE: [R.SOURCE_STOPPED],
              C.STOP_TARGET: [R.TARGET_STOPPED], C.ABORT_SOURCE: [R.SOURCE_RESUMED]}


def test_a_commit_write_that_fails_is_retried_and_nothing_runs_before_it_is_durable():
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        etcd.fail.append((keys.workload(WID), errors.Unavailable("etcd: no leader (member restarting)")))
        etcd.fail.append((keys.workload(WID), errors.Unavailable("etcd: still no leader")))
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE, "DONE")
        assert not etcd.fail, "both failing commit writes were tried"
        # the target ran and the source stopped only with the commit in etcd (phase and workload record)
        resumes = [g for g in b.got if g[0] == "RESUME_TARGET"]
        stops = [g for g in a.got if g[0] == "STOP_SOURCE"]
        assert resumes and stops
        for _, phase, node in resumes + stops:
            assert phase == P.MIGRATION_PHASE_COMMITTED and node == "nB"
        assert etcd.migration().phase == P.MIGRATION_PHASE_DONE
        assert etcd.workload().node == "nB" and wm.workloads[WID].node == "nB"
        assert "STOP_TARGET" not in b.actions() and "ABORT_SOURCE" not in a.actions()
    asyncio.run(main())


def test_while_the_commit_write_fails_the_live_record_stays_paused():
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        gate = asyncio.Event()
        real = etcd.write

        async def failing_until_gate(ops, conds=()):
            if any(o.key == keys.workload(WID) for o in ops) and not gate.is_set():
                raise errors.Unavailable("etcd: no leader")
            return await real(ops, conds)
        mm.ctl.writer.write = failing_until_gate
        b = Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=Agent("nA", mm, etcd, dict(CROSS_NODE)), nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await asyncio.sleep(0.3)       # several failed commit writes
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_PAUSED
        assert wm.workloads[WID].node == "nA"
        assert "RESUME_TARGET" not in b.actions()
        # the target node keeps its held target if its agent reconnects now (its full command)
        assert [t.id for t in mm.targets_on("nB")] == [WID]
        gate.set()
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE, "DONE")
        assert etcd.workload().node == "nB"
    asyncio.run(main())


def test_a_refused_commit_rolls_back_without_running_the_target():
    async def main():
        etcd = Etcd()
        mm, sessions, _ = manager(etcd, running_on_source())
        etcd.fail.append((keys.workload(WID), errors.Aborted("a precondition of the write failed")))
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
        assert "RESUME_TARGET" not in b.actions() and "STOP_SOURCE" not in a.actions()
        assert "STOP_TARGET" in b.actions() and "ABORT_SOURCE" in a.actions()
        assert etcd.workload().node == "nA" and etcd.migration().phase == P.MIGRATION_PHASE_ABORTED
    asyncio.run(main())


def test_a_restart_after_a_failed_commit_write_rolls_back_a_target_that_never_ran():
    """etcd says PAUSED after the failed write: the next control plane rolls back, which is right only
    because nothing told the target to run."""
    async def main():
        etcd = Etcd()
        mm, sessions, _ = manager(etcd, running_on_source())
        etcd.fail.append((keys.workload(WID), errors.Unavailable("etcd: no leader")))
        b = Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=Agent("nA", mm, etcd, dict(CROSS_NODE)), nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: not etcd.fail, "the failed commit write")
        await mm.stop()                        # the control plane goes, mid-retry
        await asyncio.sleep(0.05)
        assert etcd.migration().phase == P.MIGRATION_PHASE_PAUSED
        assert "RESUME_TARGET" not in b.actions()
    asyncio.run(main())


def test_rollback_waits_for_a_source_agent_that_is_away_longer_than_the_step_timeout(monkeypatch):
    monkeypatch.setattr(migration_steps, "STEP_TIMEOUT", 0.05)     # ABORT_SOURCE's wait: 0.1 s here
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        b = Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions["nB"] = b                               # the source's agent (nA) is away
        start(mm, migration(etcd, P.MIGRATION_PHASE_ROLLING_BACK, message="rolling back: restarted in paused"))
        await asyncio.sleep(0.3)                         # several ABORT_SOURCE waits ran out
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_ROLLING_BACK
        unknown = types_pb2.Workload()
        unknown.CopyFrom(wm.workloads[WID])
        unknown.state = types_pb2.WORKLOAD_STATE_UNKNOWN       # away past its lease: node NotReady
        wm.workloads[WID] = unknown
        await asyncio.sleep(0.3)
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_ROLLING_BACK
        assert etcd.migration().phase == P.MIGRATION_PHASE_ROLLING_BACK
        a = Agent("nA", mm, etcd, dict(CROSS_NODE))
        sessions["nA"] = a                               # it comes back: asked to resume on its session
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
        assert "ABORT_SOURCE" in a.actions()
    asyncio.run(main())


def test_rollback_asks_again_until_the_source_really_resumed():
    async def main():
        etcd = Etcd()
        mm, sessions, _ = manager(etcd, running_on_source())
        a = Agent("nA", mm, etcd, {C.ABORT_SOURCE: [R.FAILED, R.FAILED, R.SOURCE_RESUMED]})
        sessions.update(nA=a, nB=Agent("nB", mm, etcd, dict(CROSS_NODE)))
        start(mm, migration(etcd, P.MIGRATION_PHASE_ROLLING_BACK, message="rolling back: test"))
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
        assert a.actions().count("ABORT_SOURCE") == 3
    asyncio.run(main())


def test_rollback_ends_when_the_source_is_no_longer_the_workload(monkeypatch):
    monkeypatch.setattr(migration_steps, "STEP_TIMEOUT", 0.05)
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        sessions["nB"] = Agent("nB", mm, etcd, dict(CROSS_NODE))
        start(mm, migration(etcd, P.MIGRATION_PHASE_ROLLING_BACK, message="rolling back: test"))
        await asyncio.sleep(0.3)
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_ROLLING_BACK
        lost = types_pb2.Workload()
        lost.CopyFrom(wm.workloads[WID])
        lost.state = types_pb2.WORKLOAD_STATE_FAILED          # its node was declared lost
        wm.workloads[WID] = lost
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
    asyncio.run(main())


def test_a_rollback_write_that_fails_is_retried():
    """A failed step before the commit must reach ROLLING_BACK in etcd even if that write fails first."""
    async def main():
        etcd = Etcd()
        mm, sessions, _ = manager(etcd, running_on_source())
        etcd.fail.append((keys.workload(WID), errors.Aborted("refused")))
        etcd.fail.append((keys.migration(MID), errors.Unavailable("etcd: no leader")))
        a = Agent("nA", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=Agent("nB", mm, etcd, dict(CROSS_NODE)))
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
        assert "ABORT_SOURCE" in a.actions() and MID not in mm.tasks
    asyncio.run(main())


def test_targets_on_keeps_a_cross_node_target_until_the_record_names_its_node():
    etcd = Etcd()
    mm, _, wm = manager(etcd, running_on_source())
    m = migration(etcd, P.MIGRATION_PHASE_COMMITTED)
    mm.migrations[m.id] = m
    assert [t.id for t in mm.targets_on("nB")] == [WID]          # record still names the source
    moved = types_pb2.Workload()
    moved.CopyFrom(wm.workloads[WID])
    moved.node, moved.slice_id = "nB", "s-b"
    wm.workloads[WID] = moved
    assert mm.targets_on("nB") == []                             # the record itself keeps it now
    m.phase = P.MIGRATION_PHASE_DONE
    wm.workloads[WID] = running_on_source()
    assert mm.targets_on("nB") == []


def test_an_idle_resize_commit_that_fails_is_retried_and_adopted_only_once_written():
    """A slice without a workload: PLANNED -> COMMITTED swaps the two placements in one write. A failed
    write leaves the live record PLANNED and the fleet's slices as they were, and is tried again."""
    async def main():
        etcd = Etcd()
        mm, _, _ = manager(etcd, None)
        x = types_pb2.Slice(id="s-x", node="nA", gpu_index=0, profile="1g.10gb", state=types_pb2.SLICE_STATE_READY)
        tgt = types_pb2.Slice(id="s-t", node="nA", gpu_index=1, profile="3g.40gb", state=types_pb2.SLICE_STATE_READY)
        slices = {"s-x": x, "s-t": tgt}
        mm.ctl.fleet = types.SimpleNamespace(slices=slices, put_slice=lambda s: slices.__setitem__(s.id, s))
        seen = []

        async def save(changed, extra=(), extra_conds=()):
            m = M.Migration.FromString(next(o.value for o in extra if o.key == keys.migration(MID)))
            seen.append((m.phase, mm.migrations[MID].phase))
            if len(seen) < 3:
                raise errors.Unavailable("etcd: no leader")
            return await etcd.write([*extra], extra_conds)
        mm.ctl.save = save
        m = M.Migration(id=MID, source_node="nA", source_slice="s-x", target_node="nA", target_slice="s-t",
                        resize_slice="s-x", phase=P.MIGRATION_PHASE_PLANNED)
        etcd.kv[keys.migration(MID)] = m.SerializeToString()
        mm.migrations[MID] = m
        await mm._commit_idle_resize(m)
        # each try wrote COMMITTED while the live record was still PLANNED; adopted after the third
        assert seen == [(P.MIGRATION_PHASE_COMMITTED, P.MIGRATION_PHASE_PLANNED)] * 3
        assert m.phase == P.MIGRATION_PHASE_COMMITTED and mm.migrations[MID] is m
        assert etcd.migration().phase == P.MIGRATION_PHASE_COMMITTED
        assert slices["s-x"].profile == "3g.40gb" and slices["s-t"].profile == "1g.10gb"
    asyncio.run(main())


def test_finish_asks_again_while_the_target_may_run_and_ends_once_its_end_is_reported():
    """RESUME_TARGET answered FAILED (the target is not running): asked again while the workload's record
    may still run; once the target's agent reported its end, the migration ends DONE saying so."""
    async def main():
        etcd = Etcd()
        mm, sessions, wm = manager(etcd, running_on_source())
        b = Agent("nB", mm, etcd, {**CROSS_NODE, C.RESUME_TARGET: [R.FAILED]})
        sessions.update(nA=Agent("nA", mm, etcd, dict(CROSS_NODE)), nB=b)
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: b.actions().count("RESUME_TARGET") >= 3, "RESUME_TARGET asked again")
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_COMMITTED
        ended = types_pb2.Workload()
        ended.CopyFrom(wm.workloads[WID])
        ended.state = types_pb2.WORKLOAD_STATE_FAILED          # the target's agent reported it
        wm.workloads[WID] = ended
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE, "DONE")
        assert "the target ended before it ran" in mm.migrations[MID].message
    asyncio.run(main())


def test_an_unexpected_error_in_a_step_rolls_back_instead_of_ending_the_task():
    """A bug in a step (not a step's failure) ended the migration's task with the migration left PAUSED (its
    source paused) until the next leader's start; before the commit it now rolls back."""
    async def main():
        etcd = Etcd()
        mm, sessions, _ = manager(etcd, running_on_source())
        a, b = Agent("nA", mm, etcd, dict(CROSS_NODE)), Agent("nB", mm, etcd, dict(CROSS_NODE))
        sessions.update(nA=a, nB=b)
        real, raised = mm._copy, []

        async def buggy(m):
            if not raised:
                raised.append(True)
                raise KeyError("a bug")
            return await real(m)
        mm._copy = buggy
        start(mm, migration(etcd, P.MIGRATION_PHASE_PAUSED))
        await wait_for(lambda: mm.migrations[MID].phase == P.MIGRATION_PHASE_ABORTED, "ABORTED")
        assert raised and "ABORT_SOURCE" in a.actions() and etcd.workload().node == "nA"
    asyncio.run(main())
