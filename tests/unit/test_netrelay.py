"""The agent's transfer relays for workloads without network (nodeagent/isolation/netrelay.py): bytes go
through both ways, and a tenant cannot turn a relay towards another socket."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from nodeagent.isolation import netrelay

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the relays chown to the tenant's uid: root")
UID = 300123


def _echo_server(sock: socket.socket) -> None:
    def serve():
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            with c:
                while data := c.recv(65536):
                    c.sendall(data)
    threading.Thread(target=serve, daemon=True).start()


def _exchange(connect, payload: bytes) -> bytes:
    with connect() as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / ("deep-" * 20) / "w-1.d"          # longer than a Unix socket name may be
    d.mkdir(parents=True)
    os.chown(d, UID, UID)
    os.chmod(d, 0o700)
    return d


@root_only
def test_outbound_carries_bytes_from_the_workloads_socket_to_the_target(workdir):
    srv = socket.create_server(("127.0.0.1", 0))
    _echo_server(srv)
    relay = netrelay.outbound(str(workdir), UID, UID, f"127.0.0.1:{srv.getsockname()[1]}")
    try:
        assert relay.address.startswith("unix:/tmp/.gpumesh-relay/")
        host_path = workdir / ".gpumesh-relay" / os.path.basename(relay.address)
        st = os.stat(host_path)
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (UID, "0o600")
        d = os.stat(workdir / ".gpumesh-relay")
        assert d.st_uid == 0 and not d.st_mode & 0o022         # the tenant cannot swap the socket
        payload = os.urandom(3 << 20)

        def connect():
            s = socket.socket(socket.AF_UNIX)
            fd = os.open(host_path.parent, os.O_PATH)
            try:
                s.connect(f"/proc/self/fd/{fd}/{host_path.name}")
            finally:
                os.close(fd)
            return s
        assert _exchange(connect, payload) == payload
    finally:
        relay.stop()
        srv.close()


@root_only
def test_outbound_refuses_a_relay_directory_the_tenant_made(workdir):
    (workdir / ".gpumesh-relay").mkdir()
    os.chown(workdir / ".gpumesh-relay", UID, UID)
    with pytest.raises(netrelay.RelayError, match="not the agent's"):
        netrelay.outbound(str(workdir), UID, UID, "127.0.0.1:9")
    os.rmdir(workdir / ".gpumesh-relay")
    os.symlink("/etc", workdir / ".gpumesh-relay")
    with pytest.raises(OSError):
        netrelay.outbound(str(workdir), UID, UID, "127.0.0.1:9")


def _listen_as(path: str, uid: int) -> socket.socket:
    """A Unix listener at `path` made by a process of `uid` (as the workload's SDK would)."""
    s = socket.socket(socket.AF_UNIX)
    parent = os.open(os.path.dirname(path), os.O_PATH)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            s.bind(f"/proc/self/fd/{parent}/{os.path.basename(path)}")
            s.listen(8)
            os.write(ready_w, b"k")
            os.read(done_r, 1)            # hold it until the parent is done
        finally:
            os._exit(0)
    assert os.read(ready_r, 1) == b"k"
    return s, pid, done_w


@root_only
def test_inbound_reaches_the_workloads_own_socket_only(workdir, tmp_path):
    name = ".gpumesh-recv-x.sock"
    s, pid, hold = _listen_as(str(workdir / name), UID)
    _echo_server(s)                       # the same listening socket, served from here
    relay = netrelay.inbound("127.0.0.1", str(workdir), name, UID)
    try:
        host, port = relay.address.rsplit(":", 1)
        payload = os.urandom(1 << 20)
        assert _exchange(lambda: socket.create_connection((host, int(port))), payload) == payload
    finally:
        relay.stop()
        os.write(hold, b"x")
        os.waitpid(pid, 0)
        s.close()
    # a link to another socket (the agent's own, root's) is not followed; a root-served socket is refused
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(tmp_path / "roots.sock"))
    other.listen(1)
    os.unlink(workdir / name)
    os.symlink(tmp_path / "roots.sock", workdir / name)
    with pytest.raises(OSError):
        netrelay._dial_workload(str(workdir), name, UID)
    os.unlink(workdir / name)
    os.link(tmp_path / "roots.sock", workdir / name)     # a hard link: owner root
    with pytest.raises(netrelay.RelayError, match="not a socket of uid"):
        netrelay._dial_workload(str(workdir), name, UID)
    os.unlink(workdir / name)
    os.chown(tmp_path / "roots.sock", UID, UID)         # owned by the tenant but served by root
    os.link(tmp_path / "roots.sock", workdir / name)
    with pytest.raises(netrelay.RelayError, match="served by uid 0"):
        netrelay._dial_workload(str(workdir), name, UID)
    other.close()


def test_the_bench_measures_the_transfer_stream_through_the_relay():
    """`meshctl bench migrate --relay`: a real sealed transfer to a receiver in another process, through
    an outbound relay (any uid: the relay's socket is chowned to the caller's own)."""
    from tools.meshctl.bench_migrate import _link_speed
    mb_per_s, seconds = _link_speed(16 << 20, relay=True)
    assert mb_per_s > 0 and seconds > 0


@root_only
def test_a_stopped_outbound_relay_leaves_no_socket_behind(workdir):
    """L3: each checkpoint or migration made a relay; its socket used to stay in `.gpumesh-relay`."""
    relays = [netrelay.outbound(str(workdir), UID, UID, "127.0.0.1:9") for _ in range(3)]
    assert len(os.listdir(workdir / ".gpumesh-relay")) == 3
    for r in relays:
        r.stop()
    assert os.listdir(workdir / ".gpumesh-relay") == []


@root_only
def test_stopping_a_relay_never_follows_a_path_the_tenant_swapped(workdir, tmp_path):
    """The tenant may rename its directory's relay directory away and put a link to another directory in its
    place: the stop then removes nothing there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relay = netrelay.outbound(str(workdir), UID, UID, "127.0.0.1:9")
    name = os.path.basename(relay.address)
    (elsewhere / name).write_text("not the relay's")
    os.rename(workdir / ".gpumesh-relay", workdir / "moved")
    os.symlink(elsewhere, workdir / ".gpumesh-relay")
    relay.stop()
    assert (elsewhere / name).read_text() == "not the relay's"
