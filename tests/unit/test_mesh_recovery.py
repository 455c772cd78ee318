"""Mesh connections survive agent restarts: the control plane's recovery (controlplane/api/meshrecovery.py)
driven by real registrars (real shared memory segments, a real TCP data plane, the pyverbs stand-in),
with a simulated Sync session per agent and an in-memory etcd with the writer's preconditions.

An agent "dies" as a killed process does: nothing is deregistered, its data plane and (verbs) its queue
pairs and memory regions are gone, its mappings closed; the segments stay. A "restarted" agent is a new
Registrar for the same node with the same state directory."""

from __future__ import annotations

import asyncio
import os
import secrets
import types

import pytest

from controlplane.api.meshsvc import MeshManager
from controlplane.state import keys
from controlplane.state.store import Put
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.transport import connect
from mesh.transport.base import BufferDescriptor, PeerGone
from nodeagent.registrar import Registrar
from tests.unit._mesh_cluster import (FAILED, READY, RECOVERING, SliceShm, _open, cluster,  # noqa: F401 - fixture
                                      run, until)

def test_one_agent_restarts_and_the_connection_is_ready_again_with_its_bytes(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        before = os.urandom(4096)
        with _open(conn, "a") as pa:
            pa.write(100, before)
        c.kill_agent("n1")
        with pytest.raises(PeerGone):                     # its data plane died with it
            with _open(conn, "a") as pa:
                pa.read(100, 10)
        c.start_agent("n1")
        await c.open_session("n1")
        after = await c.settle(conn.id)
        return conn, after, before

    conn, after, before = run(scenario())
    assert after.state == READY and after.id == conn.id and after.secret == conn.secret
    stored = c.etcd.connection(conn.id)
    assert stored.state == READY and stored.secret == conn.secret
    # the restarted side's data plane has a new port; etcd and the record carry it; the other side is unchanged
    assert after.a.endpoint != conn.a.endpoint and stored.a.endpoint == after.a.endpoint
    assert after.a.buffer_id == conn.a.buffer_id and after.a.rkey == conn.a.rkey and after.a.address == conn.a.address
    assert stored.b == conn.b
    with _open(after, "a") as pa, _open(after, "b") as pb:
        assert pa.read(100, 4096) == before              # written before the kill, read after: same memory
        pa.write(0, b"moves again")
        pb.write(0, b"both ways")
        assert pa.read(0, 11) == b"moves again" and pb.read(0, 9) == b"both ways"


def test_bytes_written_before_the_kill_are_read_back_after_it(cluster):
    c = cluster(transport="tcp")
    payload = os.urandom(1 << 16)

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect(1 << 16)
        with _open(conn, "a") as pa, _open(conn, "b") as pb:
            pa.write(0, payload)
            pb.write(0, payload[::-1])
        c.kill_agent("n1")
        c.start_agent("n1")
        await c.open_session("n1")
        return await c.settle(conn.id)

    after = run(scenario())
    assert after.state == READY
    with _open(after, "a") as pa, _open(after, "b") as pb:
        assert pa.read(0, 1 << 16) == payload
        assert pb.read(0, 1 << 16) == payload[::-1]


def test_both_agents_restart_and_the_control_plane_too(cluster):
    c = cluster(transport="tcp")
    payload = os.urandom(8192)

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        with _open(conn, "b") as pb:
            pb.write(0, payload)
        c.kill_agent("n1")
        c.kill_agent("n2")
        # the control plane restarts too: a new manager loads the connections from etcd
        c.mgr = MeshManager(c.ctl)
        c.mgr.connections = {conn.id: c.etcd.connection(conn.id)}
        c.start_agent("n1")
        await c.open_session("n1")        # the other agent is still away: the connection waits RECOVERING
        waiting = await c.settle(conn.id)
        assert waiting.state == RECOVERING and "n1" in waiting.message
        assert c.etcd.connection(conn.id).state == RECOVERING
        c.start_agent("n2")
        await c.open_session("n2")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == READY and after.secret == conn.secret and after.id == conn.id
    assert after.a.endpoint != conn.a.endpoint and after.b.endpoint != conn.b.endpoint
    assert c.etcd.connection(conn.id) == after
    with _open(after, "b") as pb:
        assert pb.read(0, 8192) == payload


def test_a_buffer_whose_memory_is_gone_fails_the_connection_with_the_reason(cluster):
    from mesh.transport.shm import unlink_segment
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n2")
        assert unlink_segment(conn.b.shm_name)       # the memory is gone (e.g. /dev/shm cleared)
        c.start_agent("n2")
        await c.open_session("n2")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == FAILED
    assert conn.b.buffer_id in after.message and "cannot be recovered" in after.message and "n2" in after.message
    assert c.etcd.connection(conn.id).state == FAILED


def test_disconnect_during_recovery_wins(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        c.start_agent("n1")
        # hold the recovering agent's answers until the disconnect has started
        gate = asyncio.Event()
        real = c.mgr.on_registered

        async def slow(node, msg):
            if node == "n1" and not gate.is_set() and msg.descriptor.buffer_id:
                await gate.wait()
            await real(node, msg)
        c.mgr.on_registered = slow
        await c.open_session("n1")
        await until(lambda: c.mgr.connections[conn.id].state == RECOVERING, "the recovery to begin")   # held there
        from controlplane.api import auth
        token = auth._current.set(auth.Principal("client", "x", "team-a", "tenant"))
        try:
            closing = asyncio.create_task(c.mgr.disconnect(conn.id))
            await asyncio.sleep(0.01)
            gate.set()
            closed = await closing
        finally:
            auth._current.reset(token)
        await c.settle(conn.id)
        await until(lambda: c.agents["n1"].buffers == {} and c.agents["n2"].buffers == {},
                    "the late revocation reaches the agents")
        return conn, closed

    conn, closed = run(scenario())
    assert closed.state == M.MESH_CONNECTION_STATE_CLOSED
    assert conn.id not in c.mgr.connections and keys.mesh(conn.id) not in c.etcd.kv
    assert c.agents["n1"].buffers == {} and c.agents["n2"].buffers == {}       # nothing resurrected
    assert not os.path.exists("/dev/shm/" + conn.a.shm_name) and not os.path.exists("/dev/shm/" + conn.b.shm_name)


def test_a_released_slice_is_not_recovered(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        c.slices["s-a"].state = types_pb2.SLICE_STATE_RELEASING     # released while the agent was away
        c.start_agent("n1")
        await c.open_session("n1")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == READY and after.a.endpoint == conn.a.endpoint   # untouched: the release follower closes it
    assert "mesh_register" not in c.sessions["n1"].seen


def test_surviving_buffers_no_connection_knows_are_unlinked(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        del c.mgr.connections[conn.id]       # disconnected while the agent was away (its revocation was lost)
        c.start_agent("n1")
        await c.open_session("n1")
        await until(lambda: not os.path.exists("/dev/shm/" + conn.a.shm_name), "the surviving buffer is unlinked")
        await until(lambda: c.agents["n1"].records.load() == {}, "its record is gone")
        return conn

    conn = run(scenario())
    assert not os.path.exists("/dev/shm/" + conn.a.shm_name)
    assert c.agents["n1"].records.load() == {}


def test_verbs_connection_gets_new_queue_pairs_in_rts_after_a_restart(cluster):
    from mesh.transport.tcp import RdmaConnection
    from tests.unit import fakeverbs
    v = fakeverbs.make()
    c = cluster(transport="verbs", verbs=v)
    payload = os.urandom(1 << 15)

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect(1 << 15)
        a, b = BufferDescriptor.from_proto(conn.a), BufferDescriptor.from_proto(conn.b)
        await asyncio.to_thread(_rdma_write, b, a, conn.secret, payload)     # slice a's workload -> b's buffer
        c.kill_agent("n2")
        c.start_agent("n2")
        await c.open_session("n2")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == READY and after.secret == conn.secret and after.data_path == "rdma"
    # new QPs on both sides (the survivor's QP pointed at a QP that died), new MRs over the same memory
    assert {after.a.qp_num, after.b.qp_num}.isdisjoint({conn.a.qp_num, conn.b.qp_num})
    assert after.b.rkey != conn.b.rkey and after.a.rkey != conn.a.rkey
    for d, peer in ((after.a, after.b), (after.b, after.a)):
        qp = v.fabric.qps[d.qp_num]
        assert qp.qp_state == v.enums.IBV_QPS_RTS and qp.dest == peer.qp_num
    assert c.etcd.connection(conn.id) == after
    a, b = BufferDescriptor.from_proto(after.a), BufferDescriptor.from_proto(after.b)
    with RdmaConnection(b, a, secret=after.secret) as peer:
        assert peer.read(0, 1 << 15) == payload           # written by RDMA before the kill
        peer.write(0, b"by RDMA again")
    with RdmaConnection(a, b, secret=after.secret) as back:
        back.write(7, b"other way")
    with connect(b, secret=after.secret) as mine:
        assert mine.read(0, 13) == b"by RDMA again"


def _rdma_write(peer, local, secret, data):
    from mesh.transport.tcp import RdmaConnection
    with RdmaConnection(peer, local, secret=secret) as conn:
        conn.write(0, data)


def test_cuda_ipc_buffers_cannot_outlive_their_agent():
    """A cuda_ipc buffer is device memory the agent's process allocated: the registrar says it is gone."""
    from nodeagent.registrar import BufferGone
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-a": types_pb2.Slice(id="s-a")})
    r = Registrar(agent, "127.0.0.1:0", cuda_transport=object())
    try:
        with pytest.raises(BufferGone, match="died with the previous agent"):
            r.register("s-a", 4096, "cuda_ipc", "m-1", secrets.token_bytes(32), recover=True)
    finally:
        r.close()


def test_the_records_never_hold_the_secret(tmp_path):
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-a": types_pb2.Slice(id="s-a")})
    r = Registrar(agent, "127.0.0.1:0", state_dir=str(tmp_path / "rec"))
    secret = secrets.token_bytes(32)
    try:
        r.register("s-a", 4096, "shm", "m-1", secret)
        raw = b"".join((tmp_path / "rec" / f).read_bytes() for f in os.listdir(tmp_path / "rec"))
        assert b"m-1" in raw and secret not in raw and secret.hex().encode() not in raw
        r.on_desired(node_service_pb2.DesiredSlices(removals=["s-a"]))
        assert os.listdir(tmp_path / "rec") == []
    finally:
        r.close()


def test_a_control_plane_that_restarts_mid_recovery_resumes_it_from_etcd(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        c.start_agent("n1")
        # the old control plane got as far as RECOVERING (and the agent re-adopted its buffer), then died
        await c.open_session("n1")
        await c.settle(conn.id)
        recovering = c.mgr._with(c.etcd.connection(conn.id), state=RECOVERING, message="interrupted")
        await c.etcd.write([Put(keys.mesh(conn.id), recovering.SerializeToString())])
        c.mgr = MeshManager(c.ctl)
        c.mgr.connections = {conn.id: c.etcd.connection(conn.id)}
        for s in c.sessions.values():
            s.mgr = c.mgr
        for n in ("n1", "n2"):                 # both agents hold their buffers; the record says RECOVERING
            await c.open_session(n)
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == READY and after.secret == conn.secret
    assert c.etcd.connection(conn.id).state == READY
    with _open(after, "a") as pa:
        pa.write(0, b"resumed")
        assert pa.read(0, 7) == b"resumed"


def test_a_segment_whose_dev_shm_name_was_removed_is_recovered_from_the_slices_link(cluster):
    import shutil
    from mesh.transport.shm import unlink_segment
    c = cluster(transport="tcp")
    root = f"/dev/shm/gpumesh-test-{secrets.token_hex(4)}"       # the same tmpfs as the segments (hard links)
    c.isolator = SliceShm(root)
    payload = os.urandom(4096)

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        with _open(conn, "a") as pa:
            pa.write(0, payload)
        c.kill_agent("n1")
        assert unlink_segment(conn.a.shm_name)          # the name is gone; the slice still links the memory
        c.start_agent("n1")
        await c.open_session("n1")
        return conn, await c.settle(conn.id)

    try:
        conn, after = run(scenario())
        assert after.state == READY and os.path.exists("/dev/shm/" + conn.a.shm_name)
        with _open(after, "a") as pa:
            assert pa.read(0, 4096) == payload
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_segment_without_the_agents_record_is_never_adopted(cluster):
    """After a restart the agent re-adopts only what its records say it registered: a segment that stands at
    the name in the world-writable /dev/shm without one (planted, or a record lost) fails the connection."""
    import shutil
    c = cluster(transport="tcp")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        shutil.rmtree(c.tmp / "mesh" / "n1")                  # the segment is there, its record is not
        c.start_agent("n1")
        await c.open_session("n1")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == FAILED and "no record" in after.message, after.message
    assert conn.a.buffer_id not in c.agents["n1"].buffers


def test_a_symlink_in_the_slices_directory_is_never_followed_to_restore_a_segment(cluster, tmp_path):
    """The slice's private /dev/shm is the tenant's: a symlink its workload put at the segment's name (to a file
    of the host) is not linked into /dev/shm as the buffer's memory; the connection fails instead."""
    import shutil
    from mesh.transport.shm import unlink_segment
    c = cluster(transport="tcp")
    root = f"/dev/shm/gpumesh-test-{secrets.token_hex(4)}"
    c.isolator = SliceShm(root)
    victim = tmp_path / "host-file"
    victim.write_bytes(b"not the tenant's")

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        c.kill_agent("n1")
        assert unlink_segment(conn.a.shm_name)
        link = os.path.join(root, conn.a.slice_id, conn.a.shm_name)
        os.unlink(link)
        os.symlink(victim, link)                           # the tenant's workload, in its own /dev/shm
        c.start_agent("n1")
        await c.open_session("n1")
        return conn, await c.settle(conn.id)

    try:
        conn, after = run(scenario())
        assert after.state == FAILED and "regular file" in after.message, after.message
        assert not os.path.lexists("/dev/shm/" + conn.a.shm_name) and os.stat(victim).st_nlink == 1
    finally:
        c.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_slice_not_ready_yet_makes_the_recovery_wait_not_give_up(cluster, monkeypatch):
    """An agent away past its lease comes back with its slices UNKNOWN until its report: the recovery marks
    the connection RECOVERING, says it waits for the slices, revokes nothing, and finishes once they are READY
    (it used to treat them as released: the connection stayed READY with a dead endpoint)."""
    from controlplane.api import meshrecovery
    monkeypatch.setattr(meshrecovery, "RETRY_S", 0.05)
    c = cluster(transport="tcp")
    payload = os.urandom(1024)

    async def scenario():
        for n in ("n1", "n2"):
            c.start_agent(n)
            await c.open_session(n)
        conn = await c.connect()
        with _open(conn, "a") as pa:
            pa.write(0, payload)
        c.kill_agent("n1")
        c.slices["s-a"].state = types_pb2.SLICE_STATE_UNKNOWN      # the node was marked lost
        c.start_agent("n1")
        await c.open_session("n1")
        while "waiting for its slices" not in c.etcd.connection(conn.id).message:
            await asyncio.sleep(0.01)
        waiting = c.etcd.connection(conn.id)
        assert conn.a.buffer_id in c.agents["n1"].records.load()        # nothing revoked meanwhile
        c.slices["s-a"].state = types_pb2.SLICE_STATE_READY        # the node's report
        return conn, waiting, await c.settle(conn.id)

    conn, waiting, after = run(scenario())
    assert waiting.state == RECOVERING
    assert after.state == READY and after.secret == conn.secret
    with _open(after, "a") as pa:
        assert pa.read(0, 1024) == payload
