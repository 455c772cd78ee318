"""The transfer's chunk payloads over the mesh (a same-host shm ring) when it is faster,
the gRPC stream otherwise; the choice is in SendStats.transport."""

from __future__ import annotations

import os

import pytest

from mesh.checkpoint import transfer_mesh
from mesh.checkpoint.transfer import TransferClient, TransferServer
from tests.unit.test_checkpoint_transfer import MemorySink, entries, manifest_of

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")
BIG = {"a": os.urandom(300_000), "b": bytes(range(256)) * 1000, "c": b"\x01" * 7}

SECRET = bytes(range(32))



@pytest.fixture
def server():
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


def test_payload_goes_over_the_shm_ring_and_arrives_intact(server):
    sink = MemorySink()
    session = server.expect("m1", sink, mesh=True, secret=SECRET)
    assert session.ring is not None
    with TransferClient(server.address, "m1", chunk_bytes=64 << 10, mesh="shm", secret=SECRET) as c:
        stats = c.send(entries(BIG), commit=lambda st: manifest_of(BIG, st))
    assert stats.transport == "shm" and stats.transport_note == "shm"
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BIG and stats.committed == {"ok": 1}


def test_auto_attaches_the_ring_only_when_it_gains(server):
    sink = MemorySink()
    server.expect("m2", sink, mesh=True, secret=SECRET)
    with TransferClient(server.address, "m2", chunk_bytes=64 << 10, secret=SECRET) as c:
        c.stream_mb_per_s = 100.0
        small = c.send(entries({"tiny": b"xy"}))        # not worth attaching the segment for
        big = c.send(entries(BIG, gen=1))
    assert small.transport == "grpc" and "too small" in small.transport_note and big.transport == "shm"
    assert not transfer_mesh.mesh_is_faster(2, transfer_mesh.SHM_MB_PER_S, 100.0, mesh_setup_s=0.005)
    assert bytes(sink.buffers["tiny"]) == b"xy" and bytes(sink.buffers["a"]) == BIG["a"]


def test_unreachable_ring_falls_back_to_the_stream(server):
    sink = MemorySink()
    session = server.expect("m3", sink, mesh=True, secret=SECRET)
    session.ring.desc.shm_name = "gpumesh-no-such-segment"       # as seen from another host
    with TransferClient(server.address, "m3", chunk_bytes=64 << 10, secret=SECRET) as c:
        stats = c.send(entries(BIG), commit=lambda st: manifest_of(BIG, st))
    assert stats.transport == "grpc" and "not reachable" in stats.transport_note
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BIG


def test_grpc_mode_and_receivers_without_a_ring_use_the_stream(server):
    sink = MemorySink()
    server.expect("m4", sink, mesh=True, secret=SECRET)
    server.expect("m5", MemorySink(), secret=SECRET)
    with TransferClient(server.address, "m4", mesh="grpc", secret=SECRET) as c:
        assert c.send(entries(BIG)).transport == "grpc"
    with TransferClient(server.address, "m5", secret=SECRET) as c:
        st = c.send(entries(BIG))
    assert st.transport == "grpc" and "offers no mesh" in st.transport_note


def test_a_cut_stream_resumes_over_the_ring(server):
    sink = MemorySink()
    server.expect("m6", sink, mesh=True, secret=SECRET)
    with TransferClient(server.address, "m6", chunk_bytes=16 << 10, mesh="shm", secret=SECRET) as c:
        c.cut_after_bytes = 100_000
        stats = c.send(entries(BIG), commit=lambda st: manifest_of(BIG, st))
    assert stats.attempts >= 2 and stats.transport == "shm"
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BIG


def test_a_chunk_refused_by_the_receiver_is_resent_over_the_ring(server, monkeypatch):
    import grpc

    from mesh.checkpoint.transfer import ReceiveSession, _Abort
    real = ReceiveSession.chunk
    refused = []

    def flaky(self, e, header, data):
        if "slot" in header and header["offset"] > 0 and not refused:
            refused.append(header["offset"])
            raise _Abort(grpc.StatusCode.DATA_LOSS, "corrupted on the way (test)")
        return real(self, e, header, data)
    monkeypatch.setattr(ReceiveSession, "chunk", flaky)
    sink = MemorySink()
    server.expect("m7", sink, mesh=True, secret=SECRET)
    with TransferClient(server.address, "m7", chunk_bytes=16 << 10, mesh="shm", secret=SECRET) as c:
        stats = c.send(entries(BIG), commit=lambda st: manifest_of(BIG, st))
    assert refused and stats.attempts == 2 and stats.transport == "shm"
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BIG
