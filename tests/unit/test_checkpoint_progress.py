"""How long the agent waits for a workload's answer to `checkpoint` (it pushes its state into the agent's
receiver first): as long as the push delivers frames, up to `checkpoint_timeout_seconds` in all, and while the
control plane still asks for it (each repeat is answered with the bytes received so far). A push that
stops sending fails after the transfer's idle timeout, a workload that never pushes after the no-push bound
(NO_PUSH_TIMEOUT_S), not after the control socket's per-read timeout (600 s: a 100 GiB push over 150 MB/s takes
11 minutes). A real control socket (mesh/checkpoint/agent_link.py) and a real receiver; the workload's side is a
ControlServer whose `checkpoint` pushes through a real TransferClient, slowly."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import types

import pytest

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh.checkpoint.agent_link import AgentLink, ControlServer
from mesh.checkpoint.format import EntryMeta, Manifest
from mesh.checkpoint.transfer import OutEntry, TransferClient
from nodeagent import migrate_checkpoint
from nodeagent.migrate import MigrationAgent

R = M.MigrationReport
GUARD_S = 60.0          # the test's own bound on the step; the outcomes below come well before it
READ_TIMEOUT_S = 0.5    # the control socket's per-read timeout, patched short (the agent's is 600 s)
IDLE_S = 2.0            # the transfer's idle timeout between frames
CHUNK = 256


class SlowSdk:
    """The workload's control socket: `checkpoint` pushes one entry of `chunks` chunks, `delay` seconds apart,
    then commits and answers; the chunks after `stall_after` are not sent (the push hangs, its stream open)
    until the test ends; `push=False`: it never pushes nor answers until then."""

    def __init__(self, path: str, chunks: int, delay: float = 0.15, stall_after: int | None = None,
                 push: bool = True) -> None:
        self.blob = bytes(range(256)) * chunks
        self.delay, self.stall_after, self.push = delay, stall_after, push
        self.released = threading.Event()
        self.server = ControlServer(path, self.handle)

    def handle(self, req: dict) -> dict:
        assert req["cmd"] == "checkpoint"
        if not self.push:
            self.released.wait(GUARD_S)
            return {}
        blob = self.blob
        meta = EntryMeta(name="w", kind="tensor", nbytes=len(blob), dtype="uint8", shape=[len(blob)])

        def chunks(start):
            for n, o in enumerate(range(start, len(blob), CHUNK)):
                if self.released.is_set():
                    return
                if self.stall_after is not None and n >= self.stall_after:
                    self.released.wait(GUARD_S)
                    return
                time.sleep(self.delay)
                yield memoryview(blob)[o:o + CHUNK]
        with TransferClient(req["target"], req["session"], secret=bytes.fromhex(req["secret"]), chunk_bytes=CHUNK,
                            mesh="grpc", retries=0) as c:
            stats = c.send([OutEntry(meta, chunks)], commit=lambda st: Manifest(
                workload_id="w-1", step=3, checksum=c.algo,
                entries=[EntryMeta(**{**meta.to_json(), "checksum": st.checksums["w"]})]))
        return {"step": 3, "bytes": stats.bytes}

    def close(self) -> None:
        self.released.set()
        self.server.close()


def _checkpoint(tmp_path, sdk_args: dict, timeout: float | None = None, during=None) -> tuple[list, float]:
    """Runs one CHECKPOINT step against a SlowSdk; returns (reports, seconds the step took). `during(m, cmd)`: a
    coroutine run while the step runs (the control plane's repeats), cancelled when it ends."""
    runner = types.SimpleNamespace(workloads={"w-1": types_pb2.Workload(id="w-1",
                                                                         state=types_pb2.WORKLOAD_STATE_RUNNING)},
                                   meta={"w-1": {}})
    store = tmp_path / "store"
    m = MigrationAgent(types.SimpleNamespace(node="n1"), runner, str(store))
    m.transfer_idle_timeout = IDLE_S
    if timeout is not None:
        m.checkpoint_timeout = timeout
    path = str(tmp_path / "ctl.sock")
    sdk = SlowSdk(path, **sdk_args)
    # the link's timeout (connect, send, and each read of the old code) patched short; what else the agent
    # asks of the link (the new code: how long it waits for the reply) is passed on
    m._link = lambda wid, timeout=600, **kw: AgentLink(path, timeout=READ_TIMEOUT_S, uid=None, **kw)
    cmd = M.MigrationCommand(migration_id="ck-1", action=M.MigrationCommand.CHECKPOINT, workload_id="w-1",
                             path="t/w-1/ck-1", tenant="t", checkpoint_key=b"k" * 32, max_bytes=1 << 30)

    async def main():
        m.outbox, m.loop = asyncio.Queue(), asyncio.get_running_loop()
        side = asyncio.create_task(during(m, cmd)) if during is not None else None
        try:
            await asyncio.wait_for(m.on_command(cmd, m.outbox), GUARD_S)
        finally:
            if side is not None:
                side.cancel()
        return [m.outbox.get_nowait().migration for _ in range(m.outbox.qsize())]
    t0 = time.monotonic()
    try:
        out = asyncio.run(main())
    finally:
        sdk.close()
    return out, time.monotonic() - t0


def test_a_push_that_keeps_delivering_frames_outlasts_the_per_read_timeout(tmp_path):
    """Before: the agent read the workload's reply with the control socket's per-read timeout, so a push
    longer than it (here 16 frames over about 2.4 s, the timeout 0.5 s) failed although every frame arrived
    well within the transfer's idle timeout."""
    out, _ = _checkpoint(tmp_path, {"chunks": 16})
    assert [r.event for r in out] == [R.CHECKPOINTED], out[0].message
    assert out[0].bytes == 16 * CHUNK and out[0].step == 3
    assert os.path.isdir(tmp_path / "store" / "t" / "w-1" / "ck-1")


def test_a_push_that_stops_sending_fails_after_the_idle_timeout(tmp_path):
    """Frames for a while (longer than the per-read timeout), then none: the receiver gives the stream up
    after the idle timeout and the step fails naming the stall, leaving nothing in the store."""
    out, _ = _checkpoint(tmp_path, {"chunks": 64, "stall_after": 8})
    assert [r.event for r in out] == [R.FAILED]
    assert "push stalled" in out[0].message and f"sent no frame for {IDLE_S:g} s" in out[0].message, out[0].message
    assert os.listdir(tmp_path / "store" / "t" / "w-1") == [], "no partial checkpoint left in the store"


def test_a_workload_that_never_pushes_fails_at_the_no_push_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(migrate_checkpoint, "NO_PUSH_TIMEOUT_S", 1.0, raising=False)
    out, seconds = _checkpoint(tmp_path, {"chunks": 1, "push": False})
    assert [r.event for r in out] == [R.FAILED]
    assert "no checkpoint frame for 1 s" in out[0].message, out[0].message
    assert seconds < GUARD_S / 2
    assert os.listdir(tmp_path / "store" / "t" / "w-1") == []


def test_a_push_longer_than_checkpoint_timeout_seconds_fails_naming_it(tmp_path):
    """Progress keeps the agent waiting, but not past the overall bound: nothing waits forever."""
    out, seconds = _checkpoint(tmp_path, {"chunks": 400}, timeout=1.5)
    assert [r.event for r in out] == [R.FAILED]
    assert "checkpoint_timeout_seconds" in out[0].message and "1.5 s" in out[0].message, out[0].message
    assert seconds < GUARD_S / 2
    assert os.listdir(tmp_path / "store" / "t" / "w-1") == []


@pytest.mark.parametrize("bad, said", [(10, "below the minimum"), (31 * 86400, "above the maximum"),
                                       (float("nan"), "a finite number is needed")])
def test_the_agents_checkpoint_timeout_is_validated(bad, said):
    from mesh.config import ConfigError, validate
    from nodeagent.config import AgentConfig
    assert AgentConfig().checkpoint_timeout_seconds == migrate_checkpoint.CHECKPOINT_TIMEOUT_S
    with pytest.raises(ConfigError, match=f"checkpoint_timeout_seconds: .*{said}"):
        validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True,
                             checkpoint_timeout_seconds=bad))


def test_a_checkpoint_may_take_longer_than_29_minutes():
    """Before, the agent's limit was at most 1740 s (a minute under the control plane's fixed 30 minutes): a
    checkpoint of tens of GB into a slow store could not be taken. The control plane now waits while progress is
    reported (controllers/copy_wait.py), up to copy_timeout_seconds (24 h by default); the agent's default stays
    under that, and its limit may be set as high as the control plane's may."""
    import dataclasses
    from controlplane.config import ControlPlaneConfig
    from mesh.config import validate
    from nodeagent.config import AgentConfig
    cp = {f.name: f for f in dataclasses.fields(ControlPlaneConfig)}["copy_timeout_seconds"]
    agent = {f.name: f for f in dataclasses.fields(AgentConfig)}["checkpoint_timeout_seconds"]
    assert 6 * 3600 < AgentConfig().checkpoint_timeout_seconds < ControlPlaneConfig().copy_timeout_seconds
    assert agent.metadata["max"] == cp.metadata["max"]
    validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True,
                         checkpoint_timeout_seconds=7 * 86400))


async def _ask_again(m, cmd, every: float = 0.2):
    """The control plane's repeats of the step while it waits for the answer."""
    while True:
        await asyncio.sleep(every)
        await m.on_command(cmd, m.outbox)


def test_each_repeat_while_the_push_runs_is_answered_with_the_bytes_received_so_far(tmp_path):
    """What the control plane's wait goes by: without these reports it could not tell a long checkpoint that
    progresses from an agent that died."""
    out, _ = _checkpoint(tmp_path, {"chunks": 16}, during=_ask_again)
    assert out[-1].event == R.CHECKPOINTED and out[-1].bytes == 16 * CHUNK, out[-1].message
    seen = [r.bytes for r in out[:-1]]
    assert all(r.event == R.PROGRESS and not r.HasField("round") for r in out[:-1]), out
    assert seen == sorted(seen) and 0 < seen[-1] <= 16 * CHUNK, seen


def test_a_checkpoint_the_control_plane_stopped_asking_for_is_given_up_and_removed(tmp_path, monkeypatch):
    """The control plane asks again every few seconds while it waits; once it gave the step up (its idle period
    or ceiling, the caller gone) it no longer does, and the agent gives the checkpoint up instead of committing
    one that no record would name (retention would never delete it)."""
    monkeypatch.setattr(migrate_checkpoint, "UNASKED_S", 1.0, raising=False)
    out, seconds = _checkpoint(tmp_path, {"chunks": 400})
    assert out == [], "nobody waits for an answer"
    assert seconds < GUARD_S / 2
    assert os.listdir(tmp_path / "store" / "t" / "w-1") == []


def test_delete_checkpoint_while_it_runs_gives_it_up(tmp_path):
    """The control plane gave the step up and says so (DELETE_CHECKPOINT of its path): the running checkpoint
    stops and nothing of it stays in the store."""
    async def give_up(m, cmd):
        for _ in range(3):
            await asyncio.sleep(0.2)
            await m.on_command(cmd, m.outbox)
        await m.on_command(M.MigrationCommand(migration_id=cmd.migration_id, action=M.MigrationCommand.DELETE_CHECKPOINT,
                                              workload_id=cmd.workload_id, path=cmd.path, tenant=cmd.tenant), m.outbox)
    out, seconds = _checkpoint(tmp_path, {"chunks": 400}, during=give_up)
    assert [r.event for r in out] == [R.PROGRESS] * 3, out      # its progress until then, and no answer
    assert seconds < GUARD_S / 2
    assert os.listdir(tmp_path / "store" / "t" / "w-1") == []
