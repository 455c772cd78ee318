"""Transport choice from the topology, and the agent registrar's revocation on release."""

from __future__ import annotations

import asyncio
import types

import pytest

from controlplane.meshsvc import choose_transport
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


@pytest.fixture
def registrar():
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-1": object(), "s-2": object()})
    r = Registrar(agent, "127.0.0.1:0")
    yield r
    r.close()


def test_registrar_answers_and_revokes_on_release(registrar):
    outbox = asyncio.Queue()
    asyncio.run(registrar.on_register(M.MeshRegister(request_id="r1", connection_id="m-1", slice_id="s-1",
                                                     size_bytes=4096, transport="tcp"), outbox))
    reply = outbox.get_nowait().mesh_registered
    assert reply.request_id == "r1" and not reply.error
    d = BufferDescriptor.from_proto(reply.descriptor)
    assert d.endpoint == registrar.endpoint and d.shm_name and d.node == "n1"
    c = connect(d)
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


def test_registrar_verbs_buffer_also_served_over_tcp():
    from mesh.transport.tcp import TcpConnection
    from mesh.transport.verbs import VerbsTransport
    from tests.unit import fakeverbs
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-1": object()})
    r = Registrar(agent, "127.0.0.1:0", verbs_transport=VerbsTransport("n1", pyverbs=fakeverbs.make()))
    try:
        d = r.register("s-1", 4096, "verbs", "m-1")
        assert d.transport == "verbs" and d.qp_num
        with TcpConnection(d) as c:                     # a peer without verbs
            c.write(10, b"fallback")
            assert c.read(10, 8) == b"fallback"
            r.revoke_slice("s-1")
            with pytest.raises(Revoked):
                c.read(0, 1)
    finally:
        r.close()
