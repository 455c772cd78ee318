"""A checkpoint whose workload stops sending in the middle of its push (its SDK hung, its process frozen)
ends on the agent after the transfer's idle timeout: the step answers FAILED naming the stall and leaves
nothing in the store. The control plane holds a limited tenant's checkpoint lock until that answer
(controlplane/controllers/checkpoint_quota.py), so the tenant's next checkpoint waits that long, not the
workload's control-socket timeout (600 s) or the control plane's copy timeout (1800 s)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import types

import grpc

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh.checkpoint.format import EntryMeta
from mesh.checkpoint.transfer import PUSH, frame
from mesh.checkpoint.transfer_auth import client_channel, client_hello
from nodeagent.migrate import MigrationAgent

R = M.MigrationReport
GUARD_S = 30.0      # an agent that waits for the workload's reply instead answers only when the test ends


class StalledSdk:
    """The workload's control socket: `checkpoint` opens the push to the agent's receiver, sends the hello and
    the begin of an entry, and then hangs (no frame, no close, no reply) until the link is aborted (the agent
    shuts its socket down: the reply never comes) or the test ends."""

    def __init__(self) -> None:
        self.aborted = threading.Event()
        self.released = threading.Event()
        self.channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def abort(self) -> None:
        self.aborted.set()

    def call(self, command, target, session, secret):
        assert command == "checkpoint"
        key = bytes.fromhex(secret)
        hello, nonce = client_hello(key, session)
        ready, box = threading.Event(), {}
        meta = EntryMeta(name="w", kind="tensor", nbytes=4096, dtype="uint8", shape=[4096])

        def requests():
            yield frame(hello)
            ready.wait(GUARD_S)
            yield box["ch"].seal(frame({"t": "begin", "meta": meta.to_json(), "gen": 0, "offset": 0,
                                        "algo": "sha256"}))
            self.released.wait()
        self.channel = grpc.insecure_channel(target)
        call = self.channel.stream_stream(PUSH)(requests())
        try:
            box["ch"], _ = client_channel(key, session, nonce, next(call))
        finally:
            ready.set()
        while not self.released.is_set():
            if self.aborted.wait(0.05):
                raise ConnectionError("the agent closed the control socket during 'checkpoint'")
        return {}


def test_a_checkpoint_whose_push_stalls_fails_after_the_idle_timeout(tmp_path):
    runner = types.SimpleNamespace(workloads={"w-1": types_pb2.Workload(id="w-1",
                                                                         state=types_pb2.WORKLOAD_STATE_RUNNING)},
                                   meta={"w-1": {}})
    m = MigrationAgent(types.SimpleNamespace(node="n1"), runner, str(tmp_path))
    m.transfer_idle_timeout = 1.0
    sdk = StalledSdk()
    m._link = lambda wid, timeout=0, **kw: sdk
    cmd = M.MigrationCommand(migration_id="ck-1", action=M.MigrationCommand.CHECKPOINT, workload_id="w-1",
                             path="t/w-1/ck-1", tenant="t", checkpoint_key=b"k" * 32, max_bytes=1 << 20)

    async def main():
        m.outbox, m.loop = asyncio.Queue(), asyncio.get_running_loop()
        try:
            await asyncio.wait_for(m.on_command(cmd, m.outbox), GUARD_S)
        finally:
            sdk.released.set()          # an old agent still waits: let its thread end
        return [m.outbox.get_nowait().migration for _ in range(m.outbox.qsize())]
    try:
        out = asyncio.run(main())
    finally:
        if sdk.channel is not None:
            sdk.channel.close()
    assert [r.event for r in out] == [R.FAILED]
    assert "sent no frame for 1 s" in out[0].message and "idle timeout" in out[0].message, out[0].message
    assert sdk.aborted.is_set(), "the agent stopped waiting for the workload's reply"
    assert os.listdir(tmp_path / "t" / "w-1") == [], "no partial checkpoint left in the store"


def test_aborting_a_link_ends_the_call_waiting_for_its_reply(tmp_path):
    """`AgentLink.abort` (what the step above does to the real control socket) wakes the call another thread
    waits in, whose reply never comes."""
    import socket
    from mesh.checkpoint.agent_link import AgentLink
    path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()    # never answers
    link = AgentLink(path, timeout=GUARD_S * 4, uid=None)
    box: dict = {}

    def call():
        try:
            link.call("checkpoint")
        except Exception as exc:   # noqa: BLE001 - what the test looks at
            box["error"] = exc
    t = threading.Thread(target=call, daemon=True)
    t.start()
    try:
        end = time.monotonic() + GUARD_S
        while (not held or link._sock is None) and time.monotonic() < end:
            threading.Event().wait(0.02)
        link.abort()
        t.join(GUARD_S)
        assert not t.is_alive() and isinstance(box.get("error"), ConnectionError)
    finally:
        for c in held:
            c.close()
        srv.close()
