"""The verbs transport against a pyverbs stand-in (the real one needs an RDMA device)."""

from __future__ import annotations

import hashlib
import os

import pytest

from mesh.transport import verbs
from mesh.transport.base import InvalidKey, OutOfBounds, PeerGone, QueuePairError, Revoked, Unsupported
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
    assert v.fabric.mrs[b.rkey].read(64, 0) == b"A" * 64    # B's own bytes untouched by its read (staging MR)
    assert v.fabric.log == [v.enums.IBV_WR_RDMA_WRITE] * 2 + [v.enums.IBV_WR_RDMA_READ]


def test_bounds_checked_before_posting():
    v = fakeverbs.make()
    *_, ca, _ = pair(v)
    with pytest.raises(OutOfBounds):
        ca.write((1 << 16) - 4, b"12345678")
    assert v.fabric.log == []


def test_wrong_key_completes_with_remote_access_error_and_the_qp_goes_to_error():
    """RC semantics: a remote access error is fatal to the connection; nothing works afterwards."""
    v = fakeverbs.make()
    ta, tb, a, b, ca, cb = pair(v)
    ca.descriptor.rkey ^= 0xFF
    with pytest.raises(InvalidKey):
        ca.write(0, b"x")
    ca.descriptor.rkey ^= 0xFF
    assert v.fabric.qps[a.qp_num].qp_state == v.enums.IBV_QPS_ERR
    before = v.fabric.mrs[b.rkey].read(2, 0)
    with pytest.raises(QueuePairError, match="error state"):
        ca.write(0, b"ok")                                # the QP does NOT keep working
    assert v.fabric.mrs[b.rkey].read(2, 0) == before      # and nothing moved


def _wr(v, opcode, wr_id, local_mr, n, rkey, addr):
    sge = v.wr.SGE(local_mr.buf, n, local_mr.lkey)
    wr = v.wr.SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge], send_flags=v.enums.IBV_SEND_SIGNALED)
    wr.set_wr_rdma(rkey, addr)
    return wr


@pytest.mark.parametrize("fault", ["bad_rkey", "out_of_bounds", "no_remote_write"])
def test_fake_remote_access_error_then_later_work_requests_flush_in_order(fault):
    """The stand-in itself, through pyverbs' calls: the failing WR completes with REM_ACCESS_ERR,
    both QPs go to ERR, every later WR completes with WR_FLUSH_ERR (no bytes), in posting order."""
    v = fakeverbs.make()
    e = v.enums
    ta, tb, a, b, ca, cb = pair(v)
    src = v.fabric.mrs[a.rkey]
    src.write(b"Z" * 16, 16, 0)
    rkey, addr = b.rkey, b.address
    if fault == "bad_rkey":
        rkey ^= 0x7
    elif fault == "out_of_bounds":
        addr = b.address + b.length - 8
    else:
        v.fabric.mrs[b.rkey].access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
    qp = v.fabric.qps[a.qp_num]
    qp.post_send(_wr(v, e.IBV_WR_RDMA_WRITE, 1, src, 16, rkey, addr))
    qp.post_send(_wr(v, e.IBV_WR_RDMA_WRITE, 2, src, 16, b.rkey, b.address))     # a valid one behind it
    qp.post_send(_wr(v, e.IBV_WR_RDMA_READ, 3, src, 16, b.rkey, b.address))
    n, wcs = ta.buffers[a.buffer_id].cq.poll(num_entries=8)
    assert [(w.wr_id, w.status) for w in wcs] == [(1, e.IBV_WC_REM_ACCESS_ERR), (2, e.IBV_WC_WR_FLUSH_ERR),
                                                  (3, e.IBV_WC_WR_FLUSH_ERR)]
    assert all(w.byte_len == 0 for w in wcs)
    assert qp.qp_state == e.IBV_QPS_ERR and v.fabric.qps[b.qp_num].qp_state == e.IBV_QPS_ERR
    assert v.fabric.mrs[b.rkey].read(16, 0) == bytes(16)                      # nothing landed


def test_completions_in_posting_order_and_send_queue_depth():
    v = fakeverbs.make()
    e = v.enums
    ta, tb, a, b, ca, cb = pair(v)
    src, qp = v.fabric.mrs[a.rkey], v.fabric.qps[a.qp_num]
    for i in range(64):
        qp.post_send(_wr(v, e.IBV_WR_RDMA_WRITE if i % 2 else e.IBV_WR_RDMA_READ, 100 + i, src, 8, b.rkey, b.address))
    with pytest.raises(v.pyverbs_error.PyverbsRDMAError, match="Errno: 12"):    # ENOMEM: send queue full
        qp.post_send(_wr(v, e.IBV_WR_RDMA_WRITE, 999, src, 8, b.rkey, b.address))
    n, wcs = ta.buffers[a.buffer_id].cq.poll(num_entries=100)
    assert [w.wr_id for w in wcs] == list(range(100, 164))
    assert [w.opcode for w in wcs[:2]] == [e.IBV_WC_RDMA_READ, e.IBV_WC_RDMA_WRITE]


def test_connected_qp_is_not_reused_for_another_peer():
    v = fakeverbs.make()
    ta, tb, a, b, ca, cb = pair(v)
    tc = verbs.VerbsTransport("node-c", pyverbs=v)
    c = tc.register("s-c", 1 << 16)
    with pytest.raises(QueuePairError, match="not reused"):
        ta.connect(c, local_buffer_id=a.buffer_id)        # A's QP belongs to B
    assert v.fabric.qps[a.qp_num].dest == b.qp_num
    assert ta.connect(b, local_buffer_id=a.buffer_id) is ca    # the same peer again: the same connection
    # and the device refuses it too, as hardware does: RTS -> RTR towards another QP is EINVAL ...
    qp = v.fabric.qps[a.qp_num]
    attr = v.qp.QPAttr()
    attr.dest_qp_num, attr.ah_attr = c.qp_num, v.addr.AHAttr(is_global=1, grh=v.addr.GlobalRoute(
        dgid=v.addr.GID(c.gid.decode())))
    with pytest.raises(v.pyverbs_error.PyverbsRDMAError, match="RTR"):
        qp.to_rtr(attr)
    assert qp.dest == b.qp_num and qp.qp_state == v.enums.IBV_QPS_RTS
    # ... unless it goes through RESET first
    reset = v.qp.QPAttr(qp_state=v.enums.IBV_QPS_RESET)
    qp.modify(reset, v.enums.IBV_QP_STATE)
    attr.qp_access_flags = 7
    qp.to_rtr(attr)
    assert qp.dest == c.qp_num


def test_post_send_refused_before_rts():
    v = fakeverbs.make()
    t = verbs.VerbsTransport("node-a", pyverbs=v)
    d = t.register("s-a", 64)
    qp = v.fabric.qps[d.qp_num]
    mr = v.fabric.mrs[d.rkey]
    with pytest.raises(v.pyverbs_error.PyverbsRDMAError, match="post send"):
        qp.post_send(_wr(v, v.enums.IBV_WR_RDMA_WRITE, 1, mr, 8, d.rkey, d.address))


def test_large_write_and_read_go_in_staging_chunks():
    v = fakeverbs.make()
    ta, tb = verbs.VerbsTransport("node-a", pyverbs=v), verbs.VerbsTransport("node-b", pyverbs=v)
    size = verbs.STAGING_BYTES * 2 + 100
    a, b = ta.register("s-a", size), tb.register("s-b", size)
    ca = ta.connect(b, local_buffer_id=a.buffer_id)
    tb.connect(a, local_buffer_id=b.buffer_id)
    data = os.urandom(size)
    ca.write(0, data)
    assert v.fabric.mrs[b.rkey].read(size, 0) == data
    assert ca.read(0, size) == data
    assert v.fabric.log.count(v.enums.IBV_WR_RDMA_WRITE) == 3


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
    assert not os.environ.get(verbs.STANDIN_ENV), "the stand-in must not be configured for the hardware test"
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


def test_real_pyverbs_through_two_registrars():
    """On a host with an RDMA device: two agents' registrars, their QPs in RTS towards each other (loopback on
    the device's port), and a workload's RdmaConnection through its own agent; the same calls as in the
    stand-in tests, against the hardware."""
    ok, why = verbs.available()
    if not ok:
        pytest.skip(f"RDMA verbs end to end needs a device: {why} (no RDMA device in this kernel)")
    import asyncio
    import secrets
    import types

    from gpumesh.v1 import mesh_service_pb2 as M
    from mesh.transport.tcp import RdmaConnection
    from nodeagent.registrar import Registrar
    regs = []
    for node, sid in (("hw-a", "s-a"), ("hw-b", "s-b")):
        agent = types.SimpleNamespace(node=node, endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                      desired_hooks=[], desired={sid: object()})
        regs.append(Registrar(agent, "127.0.0.1:0", verbs_transport=verbs.VerbsTransport(node)))
    secret = secrets.token_bytes(32)
    try:
        da = regs[0].register("s-a", 8 << 20, "verbs", "m-hw", secret)
        db = regs[1].register("s-b", 8 << 20, "verbs", "m-hw", secret)
        for r, mine, theirs in ((regs[0], da, db), (regs[1], db, da)):
            q = asyncio.Queue()
            asyncio.run(r.on_peer(M.MeshPeer(buffer_id=mine.buffer_id, peer=theirs.to_proto(), request_id="x"), q))
            assert q.get_nowait().mesh_registered.error == ""
        data = os.urandom(8 << 20)
        with RdmaConnection(db, da, secret=secret) as peer:
            peer.write(0, data)
            assert hashlib.sha256(peer.read(0, 8 << 20)).digest() == hashlib.sha256(data).digest()
        bad = verbs.BufferDescriptor(**{**vars(db), "rkey": db.rkey ^ 0x5A})
        link = regs[0].verbs.link(da.buffer_id)
        link.descriptor = bad                                       # a wrong key on the wire: hardware's answer
        with pytest.raises(InvalidKey):
            link.write(0, b"x")
        with pytest.raises(QueuePairError):
            link.write(0, b"x")
    finally:
        for r in regs:
            r.close()
