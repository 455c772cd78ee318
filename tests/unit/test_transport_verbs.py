"""The verbs transport against a pyverbs stand-in (the real one needs an RDMA device)."""

from __future__ import annotations

import hashlib
import os

import pytest

from mesh.transport import verbs
from mesh.transport.base import InvalidKey, OutOfBounds, PeerGone, Revoked, Unsupported
from tests.unit import fakeverbs


def test_no_device_is_unsupported_with_pyverbs_reason():
    ok, why = verbs.available(fakeverbs.make(devices=False))
    assert not ok and "Failed to get devices list" in why
    t = verbs.VerbsTransport("n1", pyverbs=fakeverbs.make(devices=False))
    with pytest.raises(Unsupported) as e:
        t.register("s-1", 4096)
    assert e.value.transport == "verbs" and "Failed to get devices list" in e.value.message


def test_unknown_device_named():
    t = verbs.VerbsTransport("n1", device="mlx5_9", pyverbs=fakeverbs.make())
    with pytest.raises(Unsupported, match="mlx5_9"):
        t.open()


def pair(v):
    ta, tb = verbs.VerbsTransport("node-a", pyverbs=v), verbs.VerbsTransport("node-b", pyverbs=v)
    a, b = ta.register("s-a", 1 << 16), tb.register("s-b", 1 << 16)
    # what the control plane does: each side learns the other's descriptor (MeshPeer)
    ca = ta.connect(b, local_buffer_id=a.buffer_id)
    cb = tb.connect(a, local_buffer_id=b.buffer_id)
    return ta, tb, a, b, ca, cb


def test_register_describes_mr_and_qp():
    v = fakeverbs.make()
    t = verbs.VerbsTransport("node-a", pyverbs=v)
    d = t.register("s-a", 4096)
    mr = v.fabric.mrs[d.rkey]
    assert (d.address, d.length, d.lkey) == (mr.buf, 4096, mr.lkey)
    assert mr.access == (v.enums.IBV_ACCESS_LOCAL_WRITE | v.enums.IBV_ACCESS_REMOTE_WRITE
                         | v.enums.IBV_ACCESS_REMOTE_READ)
    qp = v.fabric.qps[d.qp_num]
    assert qp.qp_state == v.enums.IBV_QPS_INIT and d.gid.startswith(b"fe80:") and d.lid == 7
    assert d.transport == "verbs" and d.device == "mlx5_0" and 0 <= d.psn < 1 << 24


def test_rc_qps_reach_rts_and_rdma_write_read_move_bytes():
    v = fakeverbs.make()
    ta, tb, a, b, ca, cb = pair(v)
    assert v.fabric.qps[a.qp_num].qp_state == v.enums.IBV_QPS_RTS
    assert v.fabric.qps[a.qp_num].dest == b.qp_num
    data = os.urandom(1 << 16)
    assert ca.write(0, data) == 1 << 16                 # A -> B, one-sided
    assert hashlib.sha256(v.fabric.mrs[b.rkey].read(1 << 16, 0)).digest() == hashlib.sha256(data).digest()
    ca.write(0, b"A" * 64)
    v.fabric.mrs[a.rkey].write(data, 1 << 16, 0)        # what A's owner put in its own buffer
    assert cb.read(100, 50) == data[100:150]            # B -> A, one-sided read
    assert v.fabric.log == [v.enums.IBV_WR_RDMA_WRITE] * 2 + [v.enums.IBV_WR_RDMA_READ]


def test_bounds_checked_before_posting():
    v = fakeverbs.make()
    *_, ca, _ = pair(v)
    with pytest.raises(OutOfBounds):
        ca.write((1 << 16) - 4, b"12345678")
    assert v.fabric.log == []


def test_wrong_key_completes_with_remote_access_error():
    v = fakeverbs.make()
    ta, tb, a, b, ca, cb = pair(v)
    ca.descriptor.rkey ^= 0xFF
    with pytest.raises(InvalidKey):
        ca.write(0, b"x")
    ca.descriptor.rkey ^= 0xFF
    assert ca.write(0, b"ok") == 2                       # the QP still works afterwards


def test_deregister_revokes_rkey_and_peer_gone():
    v = fakeverbs.make()
    ta, tb, a, b, ca, cb = pair(v)
    tb.deregister(b.buffer_id)                           # B's MR closed: A's writes fail remotely
    with pytest.raises(PeerGone):                        # (B's QP is gone too: retries exhausted)
        ca.write(0, b"x")
    ta.deregister(a.buffer_id)
    with pytest.raises(Revoked):
        ca.write(0, b"x")


def test_real_pyverbs_end_to_end():
    ok, why = verbs.available()
    if not ok:
        pytest.skip(f"RDMA verbs end to end needs a device: {why} (no RDMA device in this kernel)")
    t = verbs.VerbsTransport("local")
    try:
        a, b = t.register("s-a", 1 << 20), t.register("s-b", 1 << 20)
        t.connect(a, local_buffer_id=b.buffer_id)
        conn = t.connect(b, local_buffer_id=a.buffer_id)
        data = os.urandom(1 << 20)
        conn.write(0, data)
        assert conn.read(0, 1 << 20) == data
    finally:
        t.close()
