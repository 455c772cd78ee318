"""The agent's end of a workload's control socket (mesh/checkpoint/agent_link.py, mesh/ownedsock.py): it talks
only to the workload's own SDK, never waits forever and never buffers an endless reply.

The socket lies in the tenant's own directory. A tenant that put a link there to another tenant's socket
used to receive, through the agent, that tenant's state as its own checkpoint (the agent sent `checkpoint`
with the session's secret to whatever the name led to)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from mesh import ownedsock
from mesh.checkpoint.agent_link import DEFAULT_TIMEOUT, MAX_REPLY_BYTES, AgentLink, ReplyTooLong
from nodeagent.migrate_base import MigrationBase
from tests.unit.test_netrelay import _listen_as as _listen_held

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the tenants' sockets are made under their uids: root")
UID_A, UID_B = 300131, 300132
CTL = ".gpumesh-ctl.sock"


def _tenant_dir(path, uid: int):
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    os.chmod(path, 0o700)
    return path


def _listen_as(path: str, uid: int):
    """A Unix listener at `path` made by a process of `uid` (as a workload's SDK would); served from here.
    (test_netrelay.py's, with a stop that lets the holding child go.)"""
    s, pid, done_w = _listen_held(path, uid)

    def stop():
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        s.close()
    return s, stop


def _serve(sock: socket.socket, heard: list) -> None:
    """An SDK stand-in on `sock`: records every request, answers ok with a step."""
    def conn(c):
        with c, c.makefile("rwb") as f:
            for line in f:
                heard.append(json.loads(line))
                f.write(b'{"ok": true, "step": 7}\n')
                f.flush()

    def accept():
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


class _Runner:
    """What MigrationBase reads of the workload runner: records and paths."""

    def __init__(self, d, meta):
        self.dir, self.meta = d, meta

    def path(self, wid, ext):
        return os.path.join(self.dir, f"{wid}.{ext}")

    def socket_path(self, wid):
        return self.meta[wid].get("socket") or self.path(wid, "sock")


@root_only
def test_a_link_to_another_tenants_socket_is_refused_and_that_socket_hears_nothing(tmp_path):
    a_dir, b_dir = _tenant_dir(tmp_path / "w-a.d", UID_A), _tenant_dir(tmp_path / "w-b.d", UID_B)
    s, stop = _listen_as(str(b_dir / CTL), UID_B)
    heard: list = []
    _serve(s, heard)
    agent = MigrationBase(agent=None, runner=_Runner(str(tmp_path), {
        "w-a": {"uid": UID_A, "socket": "/tmp/gpumesh-0123456789abcdef.sock"},   # the short link the plan made
        "w-b": {"uid": UID_B, "socket": str(b_dir / CTL)}}))
    try:
        os.symlink(b_dir / CTL, a_dir / CTL)                 # tenant A's move
        with pytest.raises(ownedsock.NotOwned, match="not a socket of uid 300131"):
            with agent._link("w-a") as link:
                link.call("checkpoint", target="127.0.0.1:1", session="s", secret="00" * 32)
        os.unlink(a_dir / CTL)
        os.link(b_dir / CTL, a_dir / CTL)                    # a hard link: the socket is B's
        with pytest.raises(ownedsock.NotOwned, match="not a socket of uid 300131"):
            with agent._link("w-a") as link:
                link.call("stop")
        with agent._link("w-b") as link:                     # B's own socket, dialled for B
            assert link.call("status")["step"] == 7
        assert heard == [{"cmd": "status"}], "a command meant for A reached B's SDK"
    finally:
        stop()


@root_only
def test_a_socket_served_by_another_uid_is_refused(tmp_path):
    """Owned by tenant A (its file), but the listener runs as B: B's SDK would hear A's commands."""
    a_dir, b_dir = _tenant_dir(tmp_path / "w-a.d", UID_A), _tenant_dir(tmp_path / "w-b.d", UID_B)
    s, stop = _listen_as(str(b_dir / CTL), UID_B)
    heard: list = []
    _serve(s, heard)
    try:
        os.chown(b_dir / CTL, UID_A, UID_A)
        os.link(b_dir / CTL, a_dir / CTL)
        with pytest.raises(ownedsock.NotOwned, match="served by uid 300132"):
            with AgentLink(str(a_dir / CTL), timeout=10, uid=UID_A) as link:
                link.call("pause", timeout=5)
        assert heard == []
    finally:
        stop()


def test_a_workload_run_unconfined_is_reached_as_the_agents_own_uid(tmp_path):
    """Tests and the demo run workloads as the agent's own uid: the checks pass for that uid."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "w-u.sock"))
    srv.listen(4)
    heard: list = []
    _serve(srv, heard)
    agent = MigrationBase(agent=None, runner=_Runner(str(tmp_path), {"w-u": {}}))
    link = agent._link("w-u", timeout=30)
    assert (link.path, link.uid, link.timeout) == (str(tmp_path / "w-u.sock"), os.geteuid(), 30)
    with link:
        assert link.call("status")["step"] == 7
    srv.close()


def test_the_agents_link_dials_a_confined_workloads_socket_in_its_directory(tmp_path):
    agent = MigrationBase(agent=None, runner=_Runner(str(tmp_path), {"w-a": {"uid": UID_A, "socket": "/tmp/x.sock"}}))
    link = agent._link("w-a")
    assert (link.path, link.uid, link.timeout) == (str(tmp_path / "w-a.d" / CTL), UID_A, DEFAULT_TIMEOUT)


def _one_connection(tmp_path, reply: bytes):
    """A socket whose SDK answers every request with `reply` (maybe nothing) and keeps the connection open."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "sdk.sock"))
    srv.listen(1)
    held = []

    def serve():
        c, _ = srv.accept()
        held.append(c)
        c.recv(65536)
        try:
            c.sendall(reply)
        except OSError:
            pass                          # the agent closed its end once it had read enough
    threading.Thread(target=serve, daemon=True).start()
    return srv, held


def test_a_reply_without_end_is_cut_at_the_limit(tmp_path):
    srv, held = _one_connection(tmp_path, b"x" * (MAX_REPLY_BYTES + (1 << 20)))
    link = AgentLink(str(tmp_path / "sdk.sock"), timeout=30)
    with pytest.raises(ReplyTooLong, match="longer than"):
        link.call("status")
    assert link._sock is None, "the link stays open after a reply it could not read"
    srv.close()
    for c in held:
        c.close()


def test_a_silent_sdk_times_out_and_every_link_has_a_timeout(tmp_path):
    assert AgentLink("x").timeout == DEFAULT_TIMEOUT
    assert AgentLink("x", timeout=None).timeout == DEFAULT_TIMEOUT
    srv, held = _one_connection(tmp_path, b"")
    with pytest.raises(TimeoutError):
        AgentLink(str(tmp_path / "sdk.sock"), timeout=0.5).call("status")
    srv.close()
    for c in held:
        c.close()


@pytest.mark.parametrize("uid", [None, os.getuid()])
def test_a_workload_without_the_sdk_is_named_as_such(tmp_path, uid):
    """No control socket: the error says the workload does not use the checkpoint SDK (what `meshctl checkpoint`
    of a plain process printed was "[Errno 2] No such file or directory: '.gpumesh-ctl.sock'")."""
    from mesh.checkpoint.agent_link import NoControlSocket
    path = str(tmp_path / CTL)
    with pytest.raises(NoControlSocket) as e:
        AgentLink(path, timeout=5, uid=uid).call("status")
    assert isinstance(e.value, FileNotFoundError)           # callers that catch the OSError see the same kind
    assert path in str(e.value) and "mesh.checkpoint SDK" in str(e.value) and "transparent" in str(e.value)


def test_a_reply_may_take_longer_than_the_links_timeout_where_the_caller_says_so(tmp_path):
    """`reply_timeout`: the reply's own limit (a checkpoint's caller bounds the wait by its push's progress and
    aborts the link itself); connect and send keep `timeout`."""
    from mesh.checkpoint.agent_link import ControlServer
    def slow(req):
        threading.Event().wait(1.5)
        return {"step": 7}
    srv = ControlServer(str(tmp_path / "sdk.sock"), slow)
    try:
        with pytest.raises(TimeoutError):
            AgentLink(srv.path, timeout=0.3).call("status")
        link = AgentLink(srv.path, timeout=0.3, reply_timeout=30)
        assert link.reply_timeout == 30 and AgentLink("x", timeout=0.3).reply_timeout == 0.3
        assert link.call("status") == {"step": 7}
        assert link._sock.gettimeout() == 0.3, "the link's own timeout again after the reply"
        link.close()
    finally:
        srv.close()


def test_an_sdk_whose_agent_went_away_before_its_answer_ends_the_connection_quietly(tmp_path):
    """The agent gave the call up (a stalled or overlong checkpoint: it shuts the socket down): the SDK's
    answer finds no reader. Its connection thread ended with a BrokenPipeError traceback in the workload's
    log (the reply left in the buffer was flushed again when the connection's file closed)."""
    from mesh.checkpoint.agent_link import ControlServer
    errors: list = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    release, threads = threading.Event(), []

    def handle(req):
        threads.append(threading.current_thread())
        release.wait(30)
        return {"step": 1}      # buffered, its flush fails (the peer is gone), and again when the file closes
    srv = ControlServer(str(tmp_path / "sdk.sock"), handle)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.path)
        s.sendall(b'{"cmd": "checkpoint"}\n')
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        end = time.monotonic() + 30
        while not threads and time.monotonic() < end:
            threading.Event().wait(0.02)
        release.set()
        for t in threads:
            t.join(30)
        assert threads and not any(t.is_alive() for t in threads)
        assert errors == [], errors
    finally:
        threading.excepthook = hook
        release.set()
        srv.close()
