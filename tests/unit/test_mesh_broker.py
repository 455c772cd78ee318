"""Transport choice from the topology, and the agent registrar's revocation on release."""

from __future__ import annotations

import asyncio
import os
import types

import pytest

from controlplane.api.meshsvc import choose_transport
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import errors
from mesh.transport import Revoked, connect
from mesh.transport.base import BufferDescriptor
from nodeagent.registrar import Registrar


def node(name, ib=False):
    n = types_pb2.Node(name=name)
    n.inventory.nics.add(name="mlx5_0" if ib else "eth0", kind="infiniband" if ib else "ethernet")
    return n


@pytest.mark.parametrize("a, b, ta, tb, requested, want", [
    (node("x"), node("x"), ["tcp", "shm"], ["tcp", "shm"], "", "shm"),
    (node("x", ib=True), node("y", ib=True), ["tcp", "verbs"], ["tcp", "verbs"], "", "verbs"),
    (node("x", ib=True), node("y", ib=True), ["tcp"], ["tcp", "verbs"], "", "tcp"),
    (node("x", ib=True), node("y"), ["tcp", "verbs"], ["tcp", "verbs"], "", "tcp"),
    (node("x"), node("y"), ["tcp"], ["tcp"], "", "tcp"),
    (node("x"), node("x"), ["tcp"], ["tcp"], "tcp", "tcp"),
])
def test_choose_transport(a, b, ta, tb, requested, want):
    got, why = choose_transport(a, b, ta, tb, requested)
    assert got == want and why


@pytest.mark.parametrize("requested, err", [("shm", errors.FailedPrecondition), ("verbs", errors.FailedPrecondition),
                                            ("carrier-pigeon", errors.InvalidArgument)])
def test_choose_transport_refuses(requested, err):
    with pytest.raises(err):
        choose_transport(node("x"), node("y"), ["tcp"], ["tcp"], requested)


def test_cuda_ipc_is_brokered_only_between_slices_of_one_node_whose_agents_have_cuda():
    with pytest.raises(errors.FailedPrecondition, match="one node"):
        choose_transport(node("x"), node("y"), ["tcp", "cuda_ipc"], ["tcp", "cuda_ipc"], "cuda_ipc")
    with pytest.raises(errors.FailedPrecondition, match="CUDA"):
        choose_transport(node("x"), node("x"), ["tcp", "shm"], ["tcp", "shm"], "cuda_ipc")
    assert choose_transport(node("x"), node("x"), ["cuda_ipc"], ["cuda_ipc"], "cuda_ipc") == ("cuda_ipc", "requested")


def test_data_path_and_why_not_rdma():
    from controlplane.api.meshchoice import data_path, fallback_reason
    assert data_path("verbs", False, True) == "rdma" and data_path("tcp", False, True) == "tcp_tls"
    assert data_path("tcp", True, True) == "tcp" and data_path("tcp", False, False) == "tcp"
    hello_ok = M.MeshHello(transports=["tcp", "shm", "verbs"])
    hello_no = M.MeshHello(transports=["tcp", "shm"], verbs_unavailable="no RDMA device: Failed to get devices list")
    why = fallback_reason("tcp", "x", node("x", ib=True), node("y", ib=True), hello_ok, hello_no)
    assert why == "node y: no RDMA device: Failed to get devices list"
    assert fallback_reason("tcp", "x", node("x"), node("y", ib=True), hello_ok, hello_ok) == \
        "node x has no InfiniBand NIC"
    assert fallback_reason("verbs", "x", node("x", ib=True), node("y", ib=True), hello_ok, hello_ok) == ""
    assert "requested" in fallback_reason("tcp", "requested", node("x"), node("y"), hello_ok, hello_ok)


@pytest.fixture
def registrar():
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-1": object(), "s-2": object()})
    r = Registrar(agent, "127.0.0.1:0")
    yield r
    r.close()


def test_registrar_answers_and_revokes_on_release(registrar):
    outbox = asyncio.Queue()
    secret = bytes(range(32))       # as the control plane sends (the agent's data plane refuses channels without one)
    asyncio.run(registrar.on_register(M.MeshRegister(request_id="r1", connection_id="m-1", slice_id="s-1",
                                                     size_bytes=4096, transport="tcp", secret=secret), outbox))
    reply = outbox.get_nowait().mesh_registered
    assert reply.request_id == "r1" and not reply.error
    d = BufferDescriptor.from_proto(reply.descriptor)
    assert d.endpoint == registrar.endpoint and d.shm_name and d.node == "n1"
    c = connect(d, secret=secret)
    c.write(0, b"data")
    registrar.on_desired(node_service_pb2.DesiredSlices(removals=["s-1"]))     # the slice was released
    with pytest.raises(Revoked):
        c.read(0, 4)
    c.close()
    hello = asyncio.Queue()
    registrar.on_session(hello)
    assert list(hello.get_nowait().mesh_hello.buffers) == []


@pytest.mark.parametrize("msg, kind", [
    (M.MeshRegister(request_id="r", slice_id="s-9", size_bytes=10, transport="tcp"), "not_found"),
    (M.MeshRegister(request_id="r", slice_id="s-1", size_bytes=0, transport="tcp"), "invalid_argument"),
    (M.MeshRegister(request_id="r", slice_id="s-1", size_bytes=10, transport="verbs"), "unavailable"),
])
def test_registrar_refusals(registrar, msg, kind):
    outbox = asyncio.Queue()
    asyncio.run(registrar.on_register(msg, outbox))
    assert outbox.get_nowait().mesh_registered.error_kind == kind


def test_full_resync_revokes_buffers_of_slices_no_longer_desired(registrar):
    registrar.register("s-1", 64, "shm", "m-1")
    registrar.register("s-2", 64, "shm", "m-1")
    registrar.on_desired(node_service_pb2.DesiredSlices(full=True, upserts=[types_pb2.Slice(id="s-2")]))
    assert [h.descriptor.slice_id for h in registrar.buffers.values()] == ["s-2"]


def _verbs_registrars(v):
    """Two agents (nodes n1, n2) with verbs on one fabric of the pyverbs stand-in."""
    from mesh.transport.verbs import VerbsTransport
    out = []
    for node, sid in (("n1", "s-1"), ("n2", "s-2")):
        agent = types.SimpleNamespace(node=node, endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                      desired_hooks=[], desired={sid: object()})
        out.append(Registrar(agent, "127.0.0.1:0", verbs_transport=VerbsTransport(node, pyverbs=v)))
    return out


def _peer(r, mine, theirs):
    outbox = asyncio.Queue()
    asyncio.run(r.on_peer(M.MeshPeer(buffer_id=mine.buffer_id, peer=theirs.to_proto(), request_id="p1"), outbox))
    return outbox.get_nowait().mesh_registered


def test_registrar_keeps_connected_qps_and_moves_bytes_by_rdma():
    """The workload asks its own agent; the agent posts RDMA WRITE/READ on the QP it keeps."""
    import secrets as _secrets

    from mesh.transport.tcp import RdmaConnection
    from tests.unit import fakeverbs
    v = fakeverbs.make()
    r1, r2 = _verbs_registrars(v)
    secret = _secrets.token_bytes(32)
    try:
        d1 = r1.register("s-1", 1 << 16, "verbs", "m-1", secret)
        d2 = r2.register("s-2", 1 << 16, "verbs", "m-1", secret)
        assert d1.shm_name and d1.qp_num and d1.rkey == v.fabric.mrs[d1.rkey].rkey
        assert _peer(r1, d1, d2).error == "" and _peer(r2, d2, d1).error == ""
        assert v.fabric.qps[d1.qp_num].qp_state == v.enums.IBV_QPS_RTS
        assert v.fabric.qps[d1.qp_num].dest == d2.qp_num
        data = os.urandom(1 << 16)
        with RdmaConnection(d2, d1, secret=secret) as peer:          # slice 1's workload -> slice 2's buffer
            assert peer.write(0, data) == 1 << 16
            assert peer.read(100, 50) == data[100:150]
        assert v.fabric.log == [v.enums.IBV_WR_RDMA_WRITE, v.enums.IBV_WR_RDMA_READ]
        with connect(d2, secret=secret) as mine:                     # slice 2's own view: its shm segment
            assert type(mine).__name__ == "ShmConnection" and mine.read(0, 1 << 16) == data
        # a QP connected to one peer is not reused for another
        again = _peer(r1, d1, BufferDescriptor(**{**vars(d2), "qp_num": d2.qp_num ^ 1}))
        assert "not reused" in again.error
        # the secret is needed to ask the agent for RDMA, too
        from mesh.transport.base import NotAuthorized
        with pytest.raises(NotAuthorized):
            RdmaConnection(d2, d1, secret=_secrets.token_bytes(32))
    finally:
        r1.close()
        r2.close()


def test_rdma_remote_access_error_moves_the_qp_to_error_through_the_agent():
    import secrets as _secrets

    from mesh.transport.base import InvalidKey, QueuePairError
    from mesh.transport.tcp import RdmaConnection
    from tests.unit import fakeverbs
    v = fakeverbs.make()
    r1, r2 = _verbs_registrars(v)
    secret = _secrets.token_bytes(32)
    try:
        d1 = r1.register("s-1", 4096, "verbs", "m-1", secret)
        d2 = r2.register("s-2", 4096, "verbs", "m-1", secret)
        forged = BufferDescriptor(**{**vars(d2), "rkey": d2.rkey ^ 0x55})   # the peer as a wrong key names it
        _peer(r1, d1, forged)
        _peer(r2, d2, d1)
        with RdmaConnection(forged, d1, secret=secret) as peer:
            with pytest.raises(InvalidKey, match="remote access error"):
                peer.write(0, b"x")
            assert v.fabric.qps[d1.qp_num].qp_state == v.enums.IBV_QPS_ERR
            with pytest.raises(QueuePairError, match="error state"):
                peer.write(0, b"x")
    finally:
        r1.close()
        r2.close()


def test_verbs_buffers_are_not_served_over_tcp_to_other_hosts(monkeypatch):
    import secrets as _secrets

    from mesh.transport import channel
    from mesh.transport.base import NotAuthorized
    from mesh.transport.tcp import TcpConnection
    from tests.unit import fakeverbs
    r1, r2 = _verbs_registrars(fakeverbs.make())
    secret = _secrets.token_bytes(32)
    try:
        d1 = r1.register("s-1", 4096, "verbs", "m-1", secret)
        with TcpConnection(d1, secret=secret) as local:              # its owner on this host: fine
            local.write(0, b"own")
        monkeypatch.setattr(channel, "same_host", lambda sock: False)
        with TcpConnection(d1, secret=secret) as remote:
            with pytest.raises(NotAuthorized, match="registered for RDMA"):
                remote.read(0, 3)
            remote.send(b"two-sided messages still go over the data plane")
    finally:
        r1.close()
        r2.close()


# -- who gets the connection secret ---------------------------------------------------------------

def _service_with_connection():
    from controlplane.api.meshsvc import MeshManager, MeshService
    ctl = types.SimpleNamespace(agent_handlers={}, fleet=types.SimpleNamespace(slices={
        "s-a": types_pb2.Slice(id="s-a", tenant="team-a"), "s-b": types_pb2.Slice(id="s-b", tenant="team-b")}))
    mgr = MeshManager(ctl)
    conn = M.MeshConnection(id="m-1", tenant="team-a", slice_a="s-a", slice_b="s-b", transport="tcp",
                            secret=b"S" * 32, state=M.MESH_CONNECTION_STATE_READY)
    mgr.connections["m-1"] = conn
    mgr.grants[("team-a", "team-b")] = M.MeshGrant(from_tenant="team-a", to_tenant="team-b")
    return MeshService(mgr)


@pytest.mark.parametrize("who, sees_secret", [
    (("viewer", "team-a"), False),       # a viewer of the owning tenant
    (("viewer", "team-b"), False),
    (("tenant", "team-a"), True),        # slice A's owner
    (("tenant", "team-b"), True),        # slice B's owner (granted peer)
    (("admin", ""), False),              # an operator who owns neither slice
])
def test_get_and_list_return_the_secret_only_to_the_slices_owners(who, sees_secret):
    from controlplane.api import auth
    svc = _service_with_connection()
    token = auth._current.set(auth.Principal("client", "x", who[1], who[0]))
    try:
        got = asyncio.run(svc.Get(M.GetMeshConnectionRequest(id="m-1"), None))
        listed = asyncio.run(svc.List(M.ListMeshConnectionsRequest(), None)).connections
    finally:
        auth._current.reset(token)
    assert [c.id for c in listed] == ["m-1"]
    assert got.secret == (b"S" * 32 if sees_secret else b"")
    assert listed[0].secret == got.secret
    assert svc.mesh.connections["m-1"].secret == b"S" * 32      # the record itself keeps it


# -- a connection whose etcd write fails is not kept ---------------------------------------------

class _FailingWriter:
    def __init__(self):
        self.calls = 0

    async def write(self, ops, conds=()):
        self.calls += 1
        raise errors.Unavailable("etcd: deadline exceeded")


def _manager_with_two_slices():
    from controlplane.api.meshsvc import MeshManager
    ready = types_pb2.SLICE_STATE_READY
    slices = {"s-a": types_pb2.Slice(id="s-a", tenant="team-a", node="n1", state=ready),
              "s-b": types_pb2.Slice(id="s-b", tenant="team-a", node="n1", state=ready)}
    ctl = types.SimpleNamespace(agent_handlers={}, writer=_FailingWriter(), sessions={},
                                fleet=types.SimpleNamespace(slices=slices,
                                                            nodes={"n1": types.SimpleNamespace(record=node("n1"))}))
    mgr = MeshManager(ctl)
    sent = []
    mgr._send = lambda node_name, **kind: sent.append((node_name, kind)) or True
    return mgr, sent


def test_connect_whose_write_fails_keeps_no_connection_and_gives_the_buffers_back():
    from controlplane.api import auth
    mgr, sent = _manager_with_two_slices()

    async def register(s, cid, size, transport, secret):
        return M.MeshRegistered(descriptor=M.BufferDescriptor(buffer_id=f"b-{s.id}", node=s.node))
    mgr._register = register
    token = auth._current.set(auth.Principal("client", "x", "team-a", "tenant"))
    try:
        with pytest.raises(errors.Unavailable):
            asyncio.run(mgr.connect(M.MeshConnectRequest(slice_a="s-a", slice_b="s-b", size_bytes=4096)))
    finally:
        auth._current.reset(token)
    assert mgr.connections == {}
    given_back = sorted(b for _, kind in sent for b in kind["mesh_deregister"].buffer_ids)
    assert given_back == ["b-s-a", "b-s-b"]


def test_disconnect_whose_write_fails_keeps_the_connection_for_a_retry():
    from controlplane.api import auth
    mgr, _ = _manager_with_two_slices()
    conn = M.MeshConnection(id="m-1", tenant="team-a", slice_a="s-a", slice_b="s-b", transport="tcp",
                            state=M.MESH_CONNECTION_STATE_READY)
    mgr.connections["m-1"] = conn

    async def revoke(node_name, buffer_ids, reason):
        return None
    mgr._revoke = revoke
    token = auth._current.set(auth.Principal("client", "x", "team-a", "tenant"))
    try:
        with pytest.raises(errors.Unavailable):
            asyncio.run(mgr.disconnect("m-1"))
        assert mgr.get("m-1") is conn         # a retry finds it (it is still in etcd), not NOT_FOUND
    finally:
        auth._current.reset(token)
