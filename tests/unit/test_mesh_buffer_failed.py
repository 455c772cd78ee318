"""A mesh buffer its agent finds unusable while it holds it (segment shrunk, header overwritten, segment removed)
turns its connection FAILED with why (nodeagent/meshhealth.py, MeshManager.on_buffer_failed): before, the record
stayed READY and peers kept opening it. The fake cluster of test_mesh_recovery: real registrars, real segments,
a real TCP data plane, the real MeshManager over an in-memory etcd."""

from __future__ import annotations

import asyncio
import os

import pytest

from gpumesh.v1 import mesh_service_pb2 as M
from mesh.transport.base import BufferDamaged
from mesh.transport.shm import unlink_segment
from nodeagent import meshhealth
from tests.unit._mesh_cluster import FAILED, READY, _open, cluster, run, until  # noqa: F401 - fixture cluster
from tests.unit.test_mesh_reopen import started


def _failed(c, cid: str) -> bool:
    return c.mgr.connections[cid].state == FAILED


def test_a_shrink_the_data_plane_meets_fails_the_connection_with_its_reason(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        with _open(conn, "a") as pa:
            pa.write(0, b"before")
        os.truncate(f"/dev/shm/{conn.a.shm_name}", 10)      # the tenant's workload shrinks its own segment
        with _open(conn, "a") as pa:                         # over a's data plane (tcp)
            with pytest.raises(BufferDamaged):
                pa.read(0, 6)
        await until(lambda: _failed(c, conn.id), "the connection turns FAILED")
        return conn

    conn = run(scenario())
    stored = c.etcd.connection(conn.id)
    assert stored.state == FAILED and stored.secret == conn.secret
    assert f"buffer {conn.a.buffer_id} of slice s-a on node n1 is unusable (shrunk)" in stored.message
    assert "shrunk to 10 bytes" in stored.message and stored.message.endswith("disconnect and connect again")


@pytest.mark.parametrize("damage, reason, says", [
    ("header", "header", "header was overwritten"),
    ("shrink", "shrunk", "was shrunk"),
    ("unlink", "gone", "was removed"),
])
def test_the_agent_s_audit_finds_what_only_a_mapping_peer_meets(cluster, monkeypatch, damage, reason, says):
    """Nothing passes through the agent's data plane (an shm peer maps the segment itself): its audit finds it."""
    monkeypatch.setattr(meshhealth, "AUDIT_S", 0.05)
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        name = f"/dev/shm/{conn.b.shm_name}"
        if damage == "header":
            fd = os.open(name, os.O_WRONLY)
            os.pwrite(fd, b"NOTMESH!", 0)
            os.close(fd)
        elif damage == "shrink":
            os.truncate(name, 30)
        else:
            assert unlink_segment(conn.b.shm_name)
        assert c.mgr.connections[conn.id].state == READY
        await until(lambda: _failed(c, conn.id), "the audit fails the connection")
        return conn

    conn = run(scenario())
    got = c.mgr.connections[conn.id]
    assert f"buffer {conn.b.buffer_id} of slice s-b on node n2 is unusable ({reason})" in got.message
    assert says in got.message and c.etcd.connection(conn.id).state == FAILED
    assert c.mgr.connections[conn.id].a == conn.a and got.b == conn.b      # nothing else rewritten


def test_a_recovery_does_not_bring_back_a_damaged_buffer_its_agent_still_holds(cluster):
    """The other side's agent restarts: the recovery asks this agent for its buffer, which a shrink broke
    meanwhile (nothing noticed yet): it answers "gone" and the connection turns FAILED, not READY."""
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        c.kill_agent("n2")
        os.truncate(f"/dev/shm/{conn.a.shm_name}", 10)
        c.start_agent("n2")
        await c.open_session("n2")
        return conn, await c.settle(conn.id)

    conn, after = run(scenario())
    assert after.state == FAILED and conn.a.buffer_id in after.message and "shrunk" in after.message


def test_a_report_counts_only_for_a_buffer_the_connection_places_on_that_node(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        bad = M.MeshBufferFailed(buffer_id=conn.a.buffer_id, connection_id=conn.id, slice_id="s-a", reason="gone",
                                 message="forged")
        await c.mgr.on_buffer_failed("n2", bad)            # n2 does not hold side a's buffer
        await c.mgr.on_buffer_failed("n1", M.MeshBufferFailed(buffer_id="b-other", connection_id=conn.id))
        return conn

    conn = run(scenario())
    assert c.mgr.connections[conn.id].state == READY and c.etcd.connection(conn.id).state == READY


def test_the_report_is_sent_again_on_every_new_stream_until_the_buffer_is_deregistered(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        r = c.agents["n1"]
        os.truncate(f"/dev/shm/{conn.a.shm_name}", 10)
        r.health.audit()
        again: asyncio.Queue = asyncio.Queue()
        r.on_session(again)                                  # a new Sync stream (the control plane restarted)
        kinds = [again.get_nowait() for _ in range(again.qsize())]
        r.deregister(conn.a.buffer_id, "disconnect")
        after: asyncio.Queue = asyncio.Queue()
        r.on_session(after)
        r.health.stop()
        return conn, kinds, [after.get_nowait().WhichOneof("kind") for _ in range(after.qsize())]

    conn, kinds, after = run(scenario())
    assert [m.WhichOneof("kind") for m in kinds] == ["mesh_hello", "mesh_buffer_failed"]
    assert kinds[1].mesh_buffer_failed.buffer_id == conn.a.buffer_id
    assert kinds[1].mesh_buffer_failed.connection_id == conn.id and kinds[1].mesh_buffer_failed.reason == "shrunk"
    assert after == ["mesh_hello"]


def test_a_damage_found_while_the_buffer_is_deregistered_leaves_no_report_behind():
    """The data plane reports from its serving thread: a buffer deregistered (on the agent's loop) between the
    report's look-up of the buffer and its record of the failure left that failure recorded for a buffer no
    longer held, reported again on every new stream for good. The record is made only while it is held."""
    from types import SimpleNamespace

    from mesh.transport.base import BufferDescriptor
    from nodeagent.registrar import Held

    class Deregistered(dict):
        """The buffers, with a deregistration (pop, then forget) right after the first look-up of each."""

        def get(self, bid, default=None):
            held = super().get(bid, default)
            if held is not None:
                self.pop(bid)
                health.forget(bid)
            return held

    held = Held(BufferDescriptor(buffer_id="b-m-1-s-a", slice_id="s-a", node="n1", transport="tcp", address=0,
                                 length=4096, rkey=7), "m-1")
    health = meshhealth.BufferHealth(SimpleNamespace(node="n1", buffers=Deregistered({"b-m-1-s-a": held})))
    health.fail("b-m-1-s-a", "shrunk", "shrunk to 10 bytes")
    assert health.failed == {} and health.failure("b-m-1-s-a") is None
