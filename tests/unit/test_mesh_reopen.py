"""A client's open mesh buffer rides through a recovery of its connection (mesh/reconnect.py): the fake cluster
of test_mesh_recovery (real registrars, real shared memory, a real TCP data plane, the real MeshManager with an
in-memory etcd); the buffer's `get` reads the manager's connections as MeshService.Get does. Operations run in a
thread (as a workload would) while the cluster's loop kills and restarts agents."""

from __future__ import annotations

import asyncio
import os

import pytest

from gpumesh.v1 import mesh_service_pb2 as M
from mesh import errors
from mesh.meshapi import MeshApi
from mesh.reconnect import ReconnectingConnection
from mesh.transport.base import OutOfBounds, PeerGone
from tests.unit._mesh_cluster import READY, Cluster, cluster, run, until  # noqa: F401 - fixture cluster


def getter(c: Cluster):
    """MeshService.Get over the manager's connections (NOT_FOUND once disconnected)."""
    def get(cid: str) -> M.MeshConnection:
        got = c.mgr.connections.get(cid)
        if got is None:
            raise errors.NotFound(f"no mesh connection {cid!r}", kind="mesh connection", name=cid)
        return got
    return get


async def started(c: Cluster) -> M.MeshConnection:
    for n in ("n1", "n2"):
        c.start_agent(n)
        await c.open_session(n)
    return await c.connect()


async def until_waiting(buf: ReconnectingConnection, op: asyncio.Future) -> None:
    """Until the operation in the thread hit the dead data plane and waits for the recovery (or ended)."""
    while buf.waiting_since is None and not op.done():
        await asyncio.sleep(0.01)


async def restart(c: Cluster, node: str, cid: str) -> M.MeshConnection:
    c.start_agent(node)
    await c.open_session(node)
    return await c.settle(cid)


def test_a_tcp_write_and_read_carry_on_after_the_agent_is_killed_and_restarted(cluster):
    c = cluster(transport="tcp")
    before, later = os.urandom(4096), os.urandom(1000)

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "a", get=getter(c), recover_timeout=120)
        await asyncio.to_thread(buf.write, 100, before)
        c.kill_agent("n1")
        reading = asyncio.ensure_future(asyncio.to_thread(buf.read, 100, 4096))
        await until_waiting(buf, reading)
        assert not reading.done()                    # it waits for the recovery instead of raising PeerGone
        after = await restart(c, "n1", conn.id)
        got = await reading
        await asyncio.to_thread(buf.write, 5000, later)
        return conn, after, buf, got

    conn, after, buf, got = run(scenario())
    assert got == before                              # the same object, the bytes written before the kill
    assert buf.reopens == 1 and buf.waiting_since is None
    assert after.state == READY and after.a.endpoint != conn.a.endpoint
    assert buf.connection.a.endpoint == after.a.endpoint and buf.descriptor.endpoint == after.a.endpoint
    with MeshApi.mesh_open(after, side="a") as fresh:  # the write after the reopen reached the same buffer
        assert fresh.read(5000, 1000) == later and fresh.read(100, 4096) == before
    buf.close()


def test_a_send_cut_by_the_restart_is_not_sent_twice_and_the_next_one_waits_for_the_recovery(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "a", get=getter(c), recover_timeout=120)
        await asyncio.to_thread(buf.write, 0, b"channel open")
        c.kill_agent("n1")
        with pytest.raises(errors.MeshSendUnconfirmed) as cut:
            await asyncio.to_thread(buf.send, b"maybe")
        sending = asyncio.ensure_future(asyncio.to_thread(buf.send, b"after"))
        await until_waiting(buf, sending)
        await restart(c, "n1", conn.id)
        await sending
        first = await asyncio.to_thread(buf.recv, 5)
        second = await asyncio.to_thread(buf.recv, 0)
        return conn, buf, cut.value, first, second

    conn, buf, cut, first, second = run(scenario())
    assert cut.connection_id == conn.id and conn.id in str(cut) and "not sent again" in str(cut)
    assert buf.reopens == 1
    assert first == b"after" and second is None       # exactly one message: nothing duplicated
    buf.close()


def test_a_connection_that_turned_failed_raises_with_its_reason(cluster):
    from mesh.transport.shm import unlink_segment
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "b", get=getter(c), recover_timeout=120)
        await asyncio.to_thread(buf.write, 0, b"x")
        c.kill_agent("n2")
        assert unlink_segment(conn.b.shm_name)        # its memory is gone: the recovery fails the connection
        reading = asyncio.ensure_future(asyncio.to_thread(buf.read, 0, 1))
        await until_waiting(buf, reading)
        await restart(c, "n2", conn.id)
        with pytest.raises(errors.MeshConnectionFailed) as failed:
            await reading
        return conn, buf, failed.value

    conn, buf, failed = run(scenario())
    assert failed.connection_id == conn.id and failed.state == "FAILED"
    assert "cannot be recovered" in failed.reason and conn.id in str(failed) and failed.reason in str(failed)
    assert buf.reopens == 0


def test_a_disconnected_connection_raises_naming_it(cluster):
    from controlplane.api import auth
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "a", get=getter(c), recover_timeout=120)
        await asyncio.to_thread(buf.write, 0, b"x")
        token = auth._current.set(auth.Principal("client", "x", "team-a", "tenant"))
        try:
            await c.mgr.disconnect(conn.id)
        finally:
            auth._current.reset(token)
        await until(lambda: all(not a.buffers for a in c.agents.values()), "the revocation reaches the agents")
        with pytest.raises(errors.MeshConnectionClosed) as closed:
            await asyncio.to_thread(buf.write, 0, b"y")
        return conn, closed.value

    conn, closed = run(scenario())
    assert closed.connection_id == conn.id and closed.state == "NOT_FOUND"
    assert conn.id in str(closed) and "disconnected" in str(closed)


def test_an_agent_that_does_not_come_back_raises_after_the_recover_timeout(cluster):
    c = cluster(transport="tcp")

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "a", get=getter(c), recover_timeout=0.3)
        await asyncio.to_thread(buf.write, 0, b"x")
        c.kill_agent("n1")
        with pytest.raises(errors.MeshRecoveryTimeout) as late:
            await asyncio.to_thread(buf.read, 0, 1)
        return conn, buf, late.value

    conn, buf, late = run(scenario())
    assert late.connection_id == conn.id and conn.id in str(late) and "0.3 s" in str(late)
    assert isinstance(late.__cause__, PeerGone) and conn.a.endpoint in str(late)
    assert buf.reopens == 0 and buf.waiting_since is None


def test_errors_that_say_nothing_about_a_recovery_are_raised_as_they_are(cluster):
    c = cluster(transport="tcp")
    calls = []

    async def scenario():
        conn = await started(c)
        get = getter(c)
        buf = ReconnectingConnection(conn, "a", get=lambda cid: calls.append(cid) or get(cid))
        with pytest.raises(OutOfBounds):
            await asyncio.to_thread(buf.write, conn.size_bytes - 1, b"two")
        assert await asyncio.to_thread(buf.write, 0, b"ok") == 2
        return buf

    buf = run(scenario())
    assert buf.reopens == 0 and calls == []           # no wait, no reopen, not even a look at the connection
    buf.close()


def test_mesh_open_reconnect_checks_its_arguments():
    conn = M.MeshConnection(id="m-1")
    with pytest.raises(ValueError, match="needs a client"):
        MeshApi.mesh_open(conn, side="a", reconnect=True)
    with pytest.raises(ValueError, match="target"):
        MeshApi.mesh_open(M.BufferDescriptor(), reconnect=True)
    with pytest.raises(ValueError, match="recover_timeout"):
        ReconnectingConnection(conn, "a", get=lambda cid: conn, recover_timeout=0)
    with pytest.raises(ValueError, match="side"):
        ReconnectingConnection(conn, "c", get=lambda cid: conn)


def test_a_verbs_buffer_waits_for_new_queue_pairs_when_its_peers_agent_restarts(cluster):
    """RDMA through the caller's own agent (the pyverbs stand-in): the peer's agent dies, its QP with it, the
    caller's QP goes to the error state; the buffer waits for the recovery's new queue pairs (the record stays
    READY with the dead ones until the restarted agent is back) and reads by RDMA again."""
    from tests.unit import fakeverbs
    v = fakeverbs.make()
    c = cluster(transport="verbs", verbs=v)
    payload = os.urandom(1 << 14)

    async def scenario():
        conn = await started(c)
        buf = ReconnectingConnection(conn, "b", get=getter(c), recover_timeout=120)
        assert type(buf.current).__name__ == "RdmaConnection"
        await asyncio.to_thread(buf.write, 0, payload)
        c.kill_agent("n2")
        reading = asyncio.ensure_future(asyncio.to_thread(buf.read, 0, 1 << 14))
        await until_waiting(buf, reading)
        assert not reading.done()
        after = await restart(c, "n2", conn.id)
        got = await reading
        await asyncio.to_thread(buf.write, 100, b"by RDMA again")
        return conn, after, buf, got

    conn, after, buf, got = run(scenario())
    assert got == payload and buf.reopens == 1
    assert after.b.qp_num != conn.b.qp_num and buf.connection.b.qp_num == after.b.qp_num
    with MeshApi.mesh_open(after, side="b") as fresh:
        assert fresh.read(100, 13) == b"by RDMA again"
    buf.close()


def test_the_callers_secret_is_used_when_the_record_has_none_and_a_denial_is_not_waited_for():
    """A caller given the secret out of band (Get answers it empty to those who need not see it) opens with
    it; while waiting, an answer of the control plane other than "away" (a permission withdrawn) is raised at
    once instead of being polled until the timeout."""
    opened = []
    conn = M.MeshConnection(id="m-1", state=READY)           # as Get answers a non-owner: no secret

    def open_(c, side, secret):
        opened.append(secret)
        if len(opened) == 1:
            raise PeerGone("the agent is gone", op="connect")
        return object()

    def denied(cid):
        raise errors.PermissionDenied("the grant was withdrawn")

    with pytest.raises(errors.PermissionDenied):
        ReconnectingConnection(conn, "a", get=denied, open=open_, secret=b"s" * 32, recover_timeout=600)
    assert opened == [b"s" * 32]

    opened.clear()                                            # the next open fails once again

    def away_then_ready(cid, answers=[errors.Unavailable("restarting")]):   # noqa: B006 - one shared list
        if answers:
            raise answers.pop()
        return conn
    buf = ReconnectingConnection(conn, "a", get=away_then_ready, open=open_, secret=b"s" * 32,
                                 sleep=lambda s: None)
    assert buf.reopens == 1 and opened[-1] == b"s" * 32
