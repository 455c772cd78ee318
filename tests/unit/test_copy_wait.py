"""How long the control plane waits for a long agent step (a checkpoint into the store, a restore's push, a
migration's copy): as long as the agent reports progress, failing only after `copy_idle_timeout_seconds` without
any, or after `copy_timeout_seconds` in all. Before, it waited a fixed 30 minutes whatever the progress, so a
checkpoint of a large workload into a slow store failed at 30 minutes while it was still being written.

The manager runs on an event loop whose clock the fake agent moves on by hand (`FakeClockLoop`): each command
the agent is sent (the control plane asks again every few seconds) stands for `step` seconds, so hours pass
without waiting for them and nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers import migration_checkpoints, migration_steps, migrations
from controlplane.controllers.migration_phases import C, P, R
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from tests.unit.test_migration_durability import MID, WID, Etcd, manager

GB = 1 << 30
MAX_ASKS = 2000         # a fake agent asked more often than this: the wait never ended


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time runs `offset` seconds ahead of the real one: timers due by then fire at once."""
    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def run(coro):
    loop = FakeClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        for _ in range(3):      # the fake agent's last reports, sent after the answer, are delivered
            loop.run_until_complete(asyncio.sleep(0))
        loop.close()


class ClockedAgent:
    """The node's agent session: each command it is sent moves the clock on by `step` seconds and is answered
    with `answer(cmd, n)` (the n-th command; None: no answer, as from a dead agent)."""

    def __init__(self, mm, node: str, step: float, answer) -> None:
        self.mm, self.node, self.step, self.answer = mm, node, step, answer
        self.got: list[M.MigrationCommand] = []

    def send(self, msg) -> None:
        cmd = msg.migration
        self.got.append(cmd)
        assert len(self.got) < MAX_ASKS, "the control plane never stopped waiting"
        loop = asyncio.get_running_loop()
        loop.offset += self.step
        rep = self.answer(cmd, len(self.got))
        if rep is not None:
            loop.call_soon(lambda: asyncio.ensure_future(self.mm._on_report(self.node, rep)))

    def actions(self, action: int) -> list[M.MigrationCommand]:
        return [c for c in self.got if c.action == action]


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """The control plane asks again at once (in real time); the fake clock says how long it waited."""
    monkeypatch.setattr(migration_checkpoints, "CHECKPOINT_RESEND", 0.001)
    monkeypatch.setattr(migration_steps, "RESEND", 0.001)
    monkeypatch.setattr(migrations, "RESEND", 0.001)


def running() -> types_pb2.Workload:
    return types_pb2.Workload(id=WID, node="nA", slice_id="s-a", tenant="t", state=types_pb2.WORKLOAD_STATE_RUNNING)


def checkpoint_manager(step: float, answer):
    mm, sessions, wm = manager(Etcd(), running())
    wm.get = lambda wid: wm.workloads[wid]
    agent = sessions["nA"] = ClockedAgent(mm, "nA", step, answer)
    return mm, agent


def progress(cmd: M.MigrationCommand, nbytes: int) -> M.MigrationReport:
    return R(migration_id=cmd.migration_id, event=R.PROGRESS, bytes=nbytes)


def test_a_checkpoint_that_keeps_progressing_is_waited_for_past_the_old_30_minutes():
    """Two hours of a push that advances 1 GiB every 5 minutes: stored, not failed at 30 minutes."""
    def answer(cmd, n):
        if n <= 24:
            return progress(cmd, n * GB)
        return R(migration_id=cmd.migration_id, event=R.CHECKPOINTED, path=cmd.path, step=9, bytes=24 * GB)
    mm, agent = checkpoint_manager(300.0, answer)

    async def main():
        t0 = asyncio.get_running_loop().time()
        ck = await mm.checkpoint(WID)
        return ck, asyncio.get_running_loop().time() - t0
    ck, waited = run(main())
    assert ck.bytes == 24 * GB and ck.step == 9 and ck.id in mm.checkpoints
    assert waited >= 2 * 3600, waited


def test_a_checkpoint_whose_progress_stops_fails_after_the_idle_period_naming_it():
    """The agent answers, but its byte count stays put: failed once copy_idle_timeout_seconds (900 s by default)
    passed without progress, not at the old 30 minutes, and the agent is told to drop what it wrote."""
    def answer(cmd, n):
        return progress(cmd, min(n, 5) * GB) if cmd.action == C.CHECKPOINT else None
    mm, agent = checkpoint_manager(60.0, answer)
    assert mm.copy_idle_timeout == 900

    async def main():
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(errors.FailedPrecondition) as e:
            await mm.checkpoint(WID)
        return str(e.value), asyncio.get_running_loop().time() - t0
    msg, waited = run(main())
    assert "no progress" in msg and "900 s" in msg and "copy_idle_timeout_seconds" in msg, msg
    assert str(5 * GB) in msg, msg                      # what was reported last
    assert 5 * 60 + 900 <= waited < 1800, waited        # the last advance was at the 5th ask
    deletes = agent.actions(C.DELETE_CHECKPOINT)
    assert [(d.migration_id, d.path) for d in deletes] == [(c.migration_id, c.path) for c in
                                                           agent.actions(C.CHECKPOINT)[:1]]
    assert mm.checkpoints == {}


def test_a_dead_agent_fails_the_checkpoint_after_the_idle_period():
    mm, agent = checkpoint_manager(60.0, lambda cmd, n: None)

    async def main():
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(errors.FailedPrecondition, match="copy_idle_timeout_seconds"):
            await mm.checkpoint(WID)
        return asyncio.get_running_loop().time() - t0
    assert 900 <= run(main()) < 1800


def test_a_checkpoint_longer_than_the_ceiling_fails_naming_it_however_it_progresses():
    mm, agent = checkpoint_manager(300.0, lambda cmd, n: progress(cmd, n * GB))
    mm.copy_timeout = 7200.0

    async def main():
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(errors.FailedPrecondition) as e:
            await mm.checkpoint(WID)
        return str(e.value), asyncio.get_running_loop().time() - t0
    msg, waited = run(main())
    assert "7200 s" in msg and "copy_timeout_seconds" in msg, msg
    assert 7200 <= waited < 7200 + 600, waited


def test_a_restore_whose_push_keeps_progressing_commits_past_the_old_30_minutes():
    """A restore's push from the store (PUSH_CHECKPOINT) shares the wait: two hours of progress, then RESTORED,
    and the migration commits; the bytes pushed so far are on the record while it copies."""
    etcd = Etcd()
    w = types_pb2.Workload(id=WID, node="nA", slice_id="s-a", tenant="t", state=types_pb2.WORKLOAD_STATE_STOPPED)
    mm, sessions, wm = manager(etcd, w)
    seen = []

    def answer(cmd, n):
        if cmd.action != C.PUSH_CHECKPOINT:
            return None
        seen.append(mm.migrations[MID].bytes_sent)
        if n <= 24:
            return progress(cmd, n * GB)
        return R(migration_id=cmd.migration_id, event=R.RESTORED, step=9, bytes=24 * GB)
    sessions["nB"] = ClockedAgent(mm, "nB", 300.0, answer)
    mm.checkpoints["ck-1"] = M.CheckpointInfo(id="ck-1", workload_id=WID, tenant="t", path="t/w-1/ck-1")
    m = M.Migration(id=MID, workload_id=WID, tenant="t", source_node="nA", source_slice="s-a", target_node="nB",
                    target_slice="s-b", session=f"mig-{MID}", target_address="10.0.0.2:1", checkpoint_id="ck-1",
                    mode=M.MIGRATION_MODE_STOP_AND_COPY, phase=P.MIGRATION_PHASE_COPYING)
    mm.migrations[MID] = m
    mm.secrets[MID] = b"x" * 32

    async def main():
        await mm._copy(m)
    run(main())
    assert m.phase == P.MIGRATION_PHASE_COMMITTED, m.message
    assert seen[-1] == 24 * GB and len(m.rounds) == 0       # progress without a round adds none


@pytest.mark.parametrize("fields, said", [
    ({"copy_idle_timeout_seconds": 5}, "copy_idle_timeout_seconds: 5 is below the minimum"),
    ({"copy_timeout_seconds": 40 * 86400}, "copy_timeout_seconds: .* is above the maximum"),
    ({"copy_idle_timeout_seconds": float("nan")}, "copy_idle_timeout_seconds: .*finite"),
    ({"copy_idle_timeout_seconds": 7200, "copy_timeout_seconds": 3600},
     "copy_idle_timeout_seconds: 7200 .* copy_timeout_seconds \\(3600"),
])
def test_the_wait_is_validated_naming_the_option(tmp_path, fields, said):
    from controlplane.config import ControlPlaneConfig
    from mesh.config import ConfigError, validate
    ok = ControlPlaneConfig(state_dir=str(tmp_path / "cp"), insecure=True)
    assert (ok.copy_idle_timeout_seconds, ok.copy_timeout_seconds) == (900, 86400)
    validate(ok)
    with pytest.raises(ConfigError, match=said):
        validate(ControlPlaneConfig(state_dir=str(tmp_path / "cp"), insecure=True, **fields))



def test_the_sdks_checkpoint_call_waits_as_long_as_the_control_plane_does():
    """Before, the SDK (and so `meshctl checkpoint`) gave a Checkpoint call a 10-minute deadline: a checkpoint the
    control plane still waited for failed at the client, and the checkpoint was given up with it. The control
    plane bounds the wait (copy_idle_timeout_seconds, copy_timeout_seconds); the call has no deadline of its own
    unless the caller gives one."""
    from mesh.migrationapi import MigrationApi
    asked = []

    class Stub:
        def Checkpoint(self, req, timeout=None):
            asked.append(timeout)
            return M.CheckpointInfo(id="ck-1", workload_id=req.workload_id)
    api = MigrationApi()
    api.timeout = 30.0
    api.__dict__["_migration_stub"] = Stub()
    assert api.checkpoint(WID).id == "ck-1" and api.checkpoint(WID, timeout=5).id == "ck-1"
    assert asked == [None, 5]


def test_a_checkpoint_call_cancelled_meanwhile_tells_the_agent_to_give_it_up():
    """The caller went away (its deadline, a cancelled call; the leader lost its lease): the agent is told at once
    to drop the checkpoint it may still be writing, not only once it notices that it is no longer asked for."""
    mm, agent = checkpoint_manager(1.0, lambda cmd, n: progress(cmd, n))

    async def main():
        task = asyncio.ensure_future(mm.checkpoint(WID))
        while len(agent.actions(C.CHECKPOINT)) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main())
    ck = agent.actions(C.CHECKPOINT)[0]
    assert [(d.migration_id, d.path) for d in agent.actions(C.DELETE_CHECKPOINT)] == [(ck.migration_id, ck.path)]


def test_a_checkpoint_written_anew_after_an_agent_restart_counts_as_progress():
    """The agent restarted mid-checkpoint and writes it anew (the step is repeat-safe): its byte count starts over
    below what was reported before, and that is progress too, not an idle period until it passes the old count."""
    def answer(cmd, n):
        if n <= 5:
            return progress(cmd, n * GB)
        if n <= 20:
            return progress(cmd, (n - 5) * GB // 2)
        return R(migration_id=cmd.migration_id, event=R.CHECKPOINTED, path=cmd.path, step=9, bytes=8 * GB)
    mm, agent = checkpoint_manager(300.0, answer)
    assert run(mm.checkpoint(WID)).bytes == 8 * GB


def _migration_copy(answer) -> M.Migration:
    """Runs a pre-copy migration's COPYING step (SEND to the source agent on nA, the clock moved 100 s per ask)
    until it commits or fails; the migration record."""
    mm, sessions, wm = manager(Etcd(), running())
    sessions["nA"] = ClockedAgent(mm, "nA", 100.0, lambda cmd, n: answer(cmd, n) if cmd.action == C.SEND else None)
    m = M.Migration(id=MID, workload_id=WID, tenant="t", source_node="nA", source_slice="s-a", target_node="nB",
                    target_slice="s-b", session=f"mig-{MID}", target_address="10.0.0.2:1",
                    mode=M.MIGRATION_MODE_PRECOPY, phase=P.MIGRATION_PHASE_COPYING)
    mm.migrations[MID] = m
    mm.secrets[MID] = b"x" * 32

    async def main():
        try:
            await mm._copy(m)
        except migration_steps.StepFailed as e:
            m.message = str(e)
    run(main())
    return m


def test_a_migration_whose_rounds_keep_coming_commits_past_the_old_30_minutes():
    def answer(cmd, n):
        if n % 6 == 0 and n <= 36:        # a pre-copy round every 10 minutes for an hour
            return R(migration_id=cmd.migration_id, event=R.PROGRESS, bytes=n * GB,
                     round=M.MigrationRound(round=n // 6 - 1, bytes=GB))
        return R(migration_id=cmd.migration_id, event=R.RESTORED, step=5, bytes=40 * GB) if n > 36 else None
    m = _migration_copy(answer)
    assert m.phase == P.MIGRATION_PHASE_COMMITTED, m.message
    assert len(m.rounds) == 6


def test_a_migrations_first_round_may_take_as_long_as_the_whole_copy_could_before():
    """A source reports its bytes only when a round ends, and the first moves the whole state: a round of 25
    minutes, which the old fixed 30 minutes allowed, is not failed by the 15-minute idle period."""
    m = _migration_copy(lambda cmd, n: R(migration_id=cmd.migration_id, event=R.RESTORED, step=5, bytes=40 * GB)
                        if n > 15 else None)
    assert m.phase == P.MIGRATION_PHASE_COMMITTED, m.message


def test_a_migration_whose_source_went_silent_fails_naming_the_limit():
    m = _migration_copy(lambda cmd, n: None)
    assert m.phase == P.MIGRATION_PHASE_COPYING, m.message
    assert "no progress of send for 1800 s (a pre-copy round's, copy_idle_timeout_seconds being 900 s" in m.message
