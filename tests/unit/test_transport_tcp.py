"""The TCP data plane: one-sided I/O with checksums, keys, bounds, revocation, peers that go away."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from mesh.transport import channel
from mesh.transport.base import BufferDescriptor, InvalidKey, OutOfBounds, PeerGone, Revoked
from mesh.transport.tcp import REQ, RESP, WRITE, TcpConnection, TcpTransport, recv_exact


@pytest.fixture
def tcp():
    t = TcpTransport("n1")
    yield t
    t.close()


def sha(b) -> bytes:
    return hashlib.sha256(b).digest()


def test_write_read_checksum_and_offsets(tcp):
    d = tcp.register("s-1", 1 << 20)
    data = os.urandom(1 << 20)
    with tcp.connect(d) as c:
        assert c.write(0, data) == 1 << 20
        assert sha(c.read(0, 1 << 20)) == sha(data)
        c.write(4096, b"z" * 100)
        into = bytearray(200)
        c.read(4000, 200, into=into)
        assert into == data[4000:4096] + b"z" * 100 + data[4196:4200]
    assert tcp.view(d.buffer_id)[4096:4196] == b"z" * 100     # the owner sees the bytes in place


def test_existing_host_buffer(tcp):
    mine = bytearray(b"\0" * 64)
    d = tcp.register("s-1", buffer=mine)
    with tcp.connect(d) as c:
        c.write(8, b"peer")
    assert mine[8:12] == b"peer"


def test_bounds_refused_nothing_outside_and_connection_usable(tcp):
    backing = bytearray(8192)
    d = tcp.register("s-1", buffer=memoryview(backing)[1024:5120])      # a 4 KiB window of a larger buffer
    with tcp.connect(d) as c:
        for off, n in ((4090, 10), (-1, 1), (5000, 1), (0, 4097)):
            with pytest.raises(OutOfBounds) as e:
                c.write(off, b"x" * n)
            assert (e.value.offset, e.value.length, e.value.region_length) == (off, n, 4096)
        with pytest.raises(OutOfBounds):
            c.read(4000, 100)
        assert backing[:1024] == bytes(1024) and backing[5120:] == bytes(3072)
        c.write(4086, b"y" * 10)                                        # still in step
        assert c.read(4086, 10) == b"y" * 10


def test_wrong_key_and_revocation(tcp):
    d1, d2 = tcp.register("s-1", 4096), tcp.register("s-2", 4096)
    forged = BufferDescriptor(**{**d1.__dict__, "rkey": d1.rkey ^ 1})
    with tcp.connect(forged) as bad, pytest.raises(InvalidKey) as e:
        bad.write(0, b"x")
    assert e.value.rkey == forged.rkey
    c1, c2 = tcp.connect(d1), tcp.connect(d2)
    c1.write(0, b"before")
    tcp.deregister(d1.buffer_id)
    with pytest.raises(Revoked):
        c1.write(0, b"after")
    with pytest.raises(Revoked):
        c1.read(0, 6)
    c2.write(0, b"other connections unaffected")
    assert c2.read(0, 5) == b"other"
    c1.close(), c2.close()


def test_send_recv_and_revoked_inbox(tcp):
    d = tcp.register("s-1", 16)
    with tcp.connect(d) as peer, tcp.connect(d) as owner:
        peer.send(b"one")
        peer.send(b"two")
        assert owner.recv(1) == b"one" and owner.recv(1) == b"two"
        assert owner.recv(0.05) is None
        tcp.deregister(d.buffer_id)
        with pytest.raises(Revoked):
            owner.recv(0.05)


def test_posted_operations_complete_in_order(tcp):
    d = tcp.register("s-1", 1 << 16)
    with tcp.connect(d) as c:
        ids = [c.post_write(i * 1024, bytes([i]) * 1024) for i in range(64)]
        bad = c.post_write(1 << 16, b"x")
        sink = bytearray(1024)
        c.post_read(5 * 1024, 1024, sink)
        done = c.poll()
        assert [x.wr_id for x in done[:64]] == ids and all(x.ok for x in done[:64])
        assert done[64].wr_id == bad and isinstance(done[64].error, OutOfBounds)
        assert done[65].ok and sink == bytes([5]) * 1024


def test_forged_raw_request_outside_region_writes_nothing(tcp):
    """A client that lies (raw frames, no SDK checks): the server drains and refuses."""
    backing = bytearray(2048)
    d = tcp.register("s-1", buffer=memoryview(backing)[512:1536])
    host, port = d.endpoint.rsplit(":", 1)
    with channel.client_open(socket.create_connection((host, int(port)))) as s:     # handshake, then raw frames
        s.sendall(REQ.pack(WRITE, 0, 0, 7, d.rkey, d.address - 512, 600) + b"E" * 600)
        resp = bytearray(RESP.size)
        recv_exact(s, memoryview(resp))
        status, tag, n = RESP.unpack(resp)
        assert (status, tag) == (2, 7)      # OUT_OF_BOUNDS
        recv_exact(s, memoryview(bytearray(n)))
    assert backing == bytearray(2048)


def test_peer_process_and_peer_gone():
    """The region lives in another process (as in an agent); then that process dies."""
    size = 1 << 20
    peer = subprocess.Popen([sys.executable, "-c", f"from tools.meshctl.benchmesh import serve; serve({size})"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        f = json.loads(peer.stdout.readline())
        d = BufferDescriptor(buffer_id=f["buffer_id"], slice_id="s", node="peer", transport="tcp",
                             address=f["address"], length=size, rkey=f["rkey"], endpoint=f["endpoint"])
        data = os.urandom(size)
        c = TcpConnection(d)
        c.write(0, data)
        assert sha(c.read(0, size)) == sha(data)
        peer.kill()
        peer.wait(10)
        with pytest.raises(PeerGone) as e:
            c.write(0, b"x")
        assert e.value.endpoint == f["endpoint"]
        with pytest.raises(PeerGone):
            TcpConnection(d)
    finally:
        if peer.poll() is None:
            peer.kill()


# -- resource limits: a connection flood, idle anonymous channels, a full inbox ------------------------------

def _wait_for(cond, deadline_s: float = 30.0, what: str = "condition"):
    import time
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_accept_survives_running_out_of_descriptors_and_close_still_ends_it(monkeypatch):
    """EMFILE from accept() (a connection flood) pauses and retries: the data plane serves the next
    connection; close() (the listener shut) still ends the accept thread."""
    import errno

    from mesh.transport.dataplane import TcpDataPlane
    real, raised = socket.socket.accept, []

    def accept(self):
        if not raised:
            raised.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)
    monkeypatch.setattr(socket.socket, "accept", accept)
    plane = TcpDataPlane("127.0.0.1", 0, "127.0.0.1")
    try:
        t = TcpTransport("n1", server=plane)
        d = t.register("s-1", 64)
        _wait_for(lambda: raised, what="the injected EMFILE")
        with TcpConnection(d, 5.0) as c:
            c.write(0, b"after EMFILE")
            assert c.read(0, 12) == b"after EMFILE"
        assert plane._thread.is_alive()
    finally:
        plane.close()
    plane._thread.join(30)
    assert not plane._thread.is_alive()


def test_connections_over_the_limit_are_closed_at_once(monkeypatch):
    from mesh.transport import dataplane
    monkeypatch.setattr(dataplane, "MAX_CONNECTIONS", 2, raising=False)
    plane = dataplane.TcpDataPlane("127.0.0.1", 0, "127.0.0.1")
    t = TcpTransport("n1", server=plane)
    d = t.register("s-1", 64)
    dropped = dataplane.CONNECTIONS_DROPPED.labels("limit")._value.get()
    idle = [socket.create_connection(("127.0.0.1", plane.port)) for _ in range(2)]  # no handshake: slots held
    try:
        extra = socket.create_connection(("127.0.0.1", plane.port))
        extra.settimeout(10)
        try:
            assert extra.recv(1) == b""                     # closed by the server, not left waiting
        except ConnectionResetError:
            pass
        extra.close()
        assert dataplane.CONNECTIONS_DROPPED.labels("limit")._value.get() == dropped + 1
        idle.pop().close()                                  # a slot frees up: connections are served again

        def served():
            try:
                with TcpConnection(d, 2.0) as c:
                    c.write(0, b"ok")
                    return c.read(0, 2) == b"ok"
            except Exception:
                return False
        _wait_for(served, what="a connection served once a slot is free")
    finally:
        for s in idle:
            s.close()
        t.close()
        plane.close()


def test_unscoped_channels_refused_where_the_plane_says_so():
    from mesh.transport.base import NotAuthorized
    from mesh.transport.dataplane import TcpDataPlane
    plane = TcpDataPlane("127.0.0.1", 0, "127.0.0.1", refuse_unscoped=True)
    try:
        t = TcpTransport("n1", server=plane)
        d = t.register("s-1", 64)                           # even a buffer without a secret: no anonymous channel
        refused = channel.CHANNELS.labels("refused_secret")._value.get()
        with pytest.raises(NotAuthorized, match="secret"):
            TcpConnection(d, 5.0)
        assert channel.CHANNELS.labels("refused_secret")._value.get() == refused + 1
    finally:
        plane.close()


def test_inbox_is_capped_in_bytes_and_a_receive_frees_room(tcp, monkeypatch):
    from mesh.transport import handler
    from mesh.transport.base import TransportError
    monkeypatch.setattr(handler, "MAX_QUEUED_BYTES", 1000, raising=False)
    d = tcp.register("s-1", 16)
    region = tcp.buffers[d.buffer_id]
    with tcp.connect(d) as peer, tcp.connect(d) as owner:
        peer.send(b"a" * 600)
        with pytest.raises(TransportError, match="inbox is full"):
            peer.send(b"b" * 600)                           # 1200 bytes would be over the cap
        peer.send(b"c" * 400)                               # exactly at the cap
        with pytest.raises(TransportError, match="inbox is full"):
            peer.send(b"d")
        assert region.queued == 1000 == sum(len(m) for m in region.inbox)
        assert owner.recv(1) == b"a" * 600                  # a receive frees its bytes
        assert region.queued == 400
        peer.send(b"e" * 600)                               # the channel stayed in step through the refusals
        assert owner.recv(1) == b"c" * 400 and owner.recv(1) == b"e" * 600
        assert region.queued == 0
