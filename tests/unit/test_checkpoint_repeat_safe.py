"""The agent's CHECKPOINT step is repeat-safe by checkpoint id (the control plane re-sends it every few
seconds): a repeat while it runs starts nothing, a repeat after it ended gets the same answer, a repeat
after an agent restart answers from the checkpoint already in the store; half-written checkpoint
directories a dead agent left are removed when the agent starts."""

from __future__ import annotations

import asyncio
import os
import time
import types

from gpumesh.v1 import migration_service_pb2 as M
from mesh.checkpoint.format import CheckpointWriter
from nodeagent import migrate_checkpoint
from nodeagent.migrate import MigrationAgent

R = M.MigrationReport
DEAD_PID = 2 ** 22 + 4321          # above pid_max's default: no such process


def agent(store):
    runner = types.SimpleNamespace(workloads={}, meta={})
    return MigrationAgent(types.SimpleNamespace(node="n1"), runner, str(store))


def cmd(ck="ck-1"):
    return M.MigrationCommand(migration_id=ck, action=M.MigrationCommand.CHECKPOINT, workload_id="w-1",
                              path=f"t/w-1/{ck}", tenant="t", checkpoint_key=b"k" * 32)


async def drive(m, *cmds, between=None):
    m.outbox, m.loop = asyncio.Queue(), asyncio.get_running_loop()
    tasks = []
    for c in cmds:
        tasks.append(asyncio.create_task(m.on_command(c, m.outbox)))
        await asyncio.sleep(0)
        if between is not None:
            await between()
    await asyncio.gather(*tasks)
    out = []
    while not m.outbox.empty():
        out.append(m.outbox.get_nowait().migration)
    return out


def test_a_repeat_after_a_restart_answers_from_the_written_checkpoint(tmp_path):
    w = CheckpointWriter(tmp_path / "t" / "w-1" / "ck-1", "w-1", private=True)
    w.commit(step=7, extras={"encryption": {"checkpoint": "ck-1", "key": "tenant"}})
    m = agent(tmp_path)                  # a new agent process: no job, the workload is not even here
    out = asyncio.run(drive(m, cmd(), cmd()))
    assert [r.event for r in out] == [R.CHECKPOINTED, R.CHECKPOINTED]
    assert out[0].step == 7 and out[0].encrypted and out[0].path == "t/w-1/ck-1" and out[0] == out[1]


def test_a_repeat_while_it_runs_starts_nothing_and_gets_the_same_answer(tmp_path, monkeypatch):
    calls = []
    gate = asyncio.Event

    async def write(self, c):
        calls.append(c.migration_id)
        await self.gate.wait()
        return R(migration_id=c.migration_id, event=R.CHECKPOINTED, path=c.path, step=3)
    monkeypatch.setattr(migrate_checkpoint.CheckpointSteps, "_write_checkpoint", write)
    m = agent(tmp_path)

    async def main():
        m.gate = gate()
        state = {"n": 0}

        async def between():
            state["n"] += 1
            if state["n"] == 2:
                m.gate.set()            # the first run ends after the second command arrived
        first = await drive(m, cmd(), cmd(), between=between)
        again = await drive(m, cmd())
        return first, again
    first, again = asyncio.run(main())
    assert calls == ["ck-1"]
    assert [r.event for r in first] == [R.CHECKPOINTED] and again == first


def test_a_failure_is_answered_the_same_way_to_a_repeat(tmp_path):
    m = agent(tmp_path)
    out = asyncio.run(drive(m, cmd(), cmd()))
    assert [r.event for r in out] == [R.FAILED, R.FAILED] and "does not run" in out[0].message


def test_partial_checkpoints_of_a_dead_agent_are_removed_at_start(tmp_path):
    d = tmp_path / "t" / "w-1"
    d.mkdir(parents=True)
    done = d / "ck-1"
    (done / "data").mkdir(parents=True)
    stale = d / f"ck-2.partial-{DEAD_PID}"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "e0").write_bytes(b"x")
    old = d / f"ck-1.old-{DEAD_PID}"
    old.mkdir()
    fresh = d / f"ck-3.partial-{DEAD_PID + 1}"         # another host's writer, still writing
    fresh.mkdir()
    live = d / f"ck-4.partial-{os.getpid()}"
    live.mkdir()
    past = time.time() - 2 * migrate_checkpoint.PARTIAL_STALE_S
    for p in (stale, stale / "data", stale / "data" / "e0", old, live):
        os.utime(p, (past, past))
    orphan = d / f"ck-5.old-{DEAD_PID}"                 # died between the renames: the only copy of ck-5
    (orphan / "data").mkdir(parents=True)
    past = time.time() - 2 * migrate_checkpoint.PARTIAL_STALE_S
    for p in (orphan, orphan / "data"):
        os.utime(p, (past, past))
    migrate_checkpoint.clean_store(str(tmp_path))       # what the agent's start does (nodeagent/migrate.py)
    assert not stale.exists() and not old.exists()
    assert done.exists() and fresh.exists() and live.exists()
    assert (d / "ck-5" / "data").is_dir() and not orphan.exists()


class FakeLink:
    """The workload's control socket: `push` does what its SDK would with the agent's receiver."""

    def __init__(self, push) -> None:
        self.push = push

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def call(self, command, **req):
        assert command == "checkpoint"
        return self.push(req)


def running_agent(store, push):
    from gpumesh.v1 import types_pb2
    m = agent(store)
    m.runner.workloads["w-1"] = types.SimpleNamespace(state=types_pb2.WORKLOAD_STATE_RUNNING)
    m._link = lambda wid, timeout=0, **kw: FakeLink(push)
    return m


def _send(req, commit: bool) -> dict:
    from mesh.checkpoint.format import EntryMeta, Manifest
    from mesh.checkpoint.transfer import OutEntry, TransferClient
    blob = b"\x05" * 3000
    meta = EntryMeta(name="w", kind="tensor", nbytes=len(blob), dtype="uint8", shape=[len(blob)])
    with TransferClient(req["target"], req["session"], secret=bytes.fromhex(req["secret"]), retries=0) as c:
        st = c.send([OutEntry(meta, lambda start: iter([memoryview(blob)[start:]]))], commit=(lambda st: Manifest(
            workload_id="w-1", step=9, entries=[EntryMeta(**{**meta.to_json(), "checksum": st.checksums["w"]})]))
            if commit else None)
    return {"step": 9, "bytes": st.bytes}


def _partials(store) -> list[str]:
    return [p.name for p in (store / "t" / "w-1").iterdir() if ".partial-" in p.name]


def test_a_checkpoint_the_workload_committed_is_reported_and_in_the_store(tmp_path):
    out = asyncio.run(drive(running_agent(tmp_path, lambda req: _send(req, commit=True)), cmd()))
    assert [r.event for r in out] == [R.CHECKPOINTED] and out[0].step == 9 and out[0].bytes == 3000
    assert (tmp_path / "t" / "w-1" / "ck-1" / "manifest.json").exists() and _partials(tmp_path) == []


def test_an_ok_without_a_commit_fails_and_leaves_no_partial_checkpoint(tmp_path):
    """The workload's reply is its own word: only a commit the agent's receiver took is a checkpoint."""
    out = asyncio.run(drive(running_agent(tmp_path, lambda req: _send(req, commit=False)), cmd()))
    assert [r.event for r in out] == [R.FAILED] and "did not commit its checkpoint" in out[0].message
    assert not (tmp_path / "t" / "w-1" / "ck-1").exists() and _partials(tmp_path) == []


def test_a_failed_checkpoint_leaves_no_partial_checkpoint(tmp_path):
    def push(req):
        _send(req, commit=False)
        raise RuntimeError("the workload went away")
    out = asyncio.run(drive(running_agent(tmp_path, push), cmd()))
    assert [r.event for r in out] == [R.FAILED] and "went away" in out[0].message
    assert _partials(tmp_path) == []


class _CommitThenFail:
    """A tenant's SDK on the control socket: pushes a whole checkpoint (the agent's receiver commits it),
    then answers the `checkpoint` command with an error."""

    def __init__(self) -> None:
        self.pushed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def call(self, cmd, target, session, secret):
        from mesh.checkpoint.agent_link import CommandError
        from mesh.checkpoint.format import EntryMeta, Manifest
        from mesh.checkpoint.transfer import OutEntry, TransferClient
        blob = b"\x01" * 100
        meta = EntryMeta(name="t", kind="tensor", nbytes=len(blob), dtype="uint8", shape=[len(blob)])
        with TransferClient(target, session, secret=bytes.fromhex(secret), mesh="grpc") as c:
            stats = c.send([OutEntry(meta, lambda start: [memoryview(blob)[start:]])], commit=lambda st: Manifest(
                workload_id="w-1", step=5, checksum=c.algo, entries=[EntryMeta(
                    **{**meta.to_json(), "checksum": st.checksums["t"]})]))
        self.pushed = stats.committed is not None
        raise CommandError(cmd, "RuntimeError", "the SDK failed after its commit")


def test_a_checkpoint_that_fails_after_the_commit_leaves_nothing_in_the_store(tmp_path):
    """The step answers FAILED, so the control plane records no checkpoint and never expires one: what the
    agent's receiver committed before the failure must not stay in the store (a tenant could leave a
    checkpoint there, uncounted and never deleted, with every request)."""
    from gpumesh.v1 import types_pb2
    m = agent(tmp_path)
    m.runner.workloads["w-1"] = types_pb2.Workload(id="w-1", state=types_pb2.WORKLOAD_STATE_RUNNING)
    m.runner.meta["w-1"] = {}
    sdk = _CommitThenFail()
    m._link = lambda wid, timeout=0, **kw: sdk
    out = asyncio.run(drive(m, cmd()))
    assert sdk.pushed, "the receiver committed the push"
    assert [r.event for r in out] == [R.FAILED] and "after its commit" in out[0].message
    assert not (tmp_path / "t" / "w-1" / "ck-1").exists()
    assert os.listdir(tmp_path / "t" / "w-1") == []
