"""The mesh across real agent processes: brokered buffers, one-sided I/O with checksums,
keys and bounds, revocation on release, tenant isolation; and two agents in separate
network namespaces (as two hosts) bridged by veth."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from gpumesh.v1 import mesh_service_pb2 as M
from mesh import errors
from mesh.transport import InvalidKey, NotAuthorized, OutOfBounds, Revoked, connect
from mesh.transport.base import BufferDescriptor
from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

HOSTS = [
    {"node": "mesh-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
    {"node": "mesh-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("mesh"), HOSTS, lease_ttl=3, agents_per_process=1)
    c.start(timeout=90)
    yield c
    c.stop()


@pytest.fixture
def mesh(cluster):
    cluster.wait_ready(timeout=60)
    with cluster.client(timeout=30) as client:
        yield client
        for c in client.mesh_list():
            client.mesh_disconnect(c.id)
        for s in client.list_slices():
            try:
                client.release(s.id)
            except errors.MeshError:
                pass


def slice_on(mesh, node: str, tenant: str):
    others = [n for n in ("mesh-a", "mesh-b") if n != node]
    for n in others:
        mesh.cordon(n)
    try:
        return mesh.allocate(tenant=tenant, mig_profile="1g.10gb").slices[0]
    finally:
        for n in others:
            mesh.uncordon(n)


def sha(b) -> str:
    return hashlib.sha256(b).hexdigest()


def test_connect_across_agents_write_read_checksums(mesh):
    a, b = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-b", "team-a")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=4 << 20)
    assert conn.transport == "tcp" and conn.a.node == "mesh-a" and conn.b.node == "mesh-b"
    assert conn.a.rkey and conn.b.rkey and conn.a.endpoint != conn.b.endpoint
    # the record says how bytes move and why not RDMA: both agents share this host, so their channels are
    # same-host plaintext (TLS is for other hosts: the network-namespace test below)
    assert conn.data_path == "tcp" and "no InfiniBand NIC" in conn.fallback_reason
    assert len(conn.secret) == 32 and conn.a.tls_sha256 and conn.b.tls_sha256
    assert mesh.mesh_get(conn.id).state == 1
    payload = os.urandom(4 << 20)
    with mesh.mesh_open(conn, side="b") as pb, mesh.mesh_open(conn, side="a") as pa:
        assert not pb.tls
        pb.write(0, payload)
        pa.write(1000, payload[:5000])
        assert sha(pb.read(0, 4 << 20)) == sha(payload)
        assert sha(pa.read(1000, 5000)) == sha(payload[:5000])
        # bounds: refused, nothing written past the end, the connection still usable
        with pytest.raises(OutOfBounds) as oob:
            pb.write((4 << 20) - 10, b"x" * 20)
        assert oob.value.region_length == 4 << 20
        assert pb.read((4 << 20) - 10, 10) == payload[-10:]
        # a forged key is refused; the real connection is unaffected
        forged = BufferDescriptor.from_proto(conn.b)
        forged.rkey ^= 0x5A5A
        with mesh.mesh_open(forged, secret=conn.secret) as bad, pytest.raises(InvalidKey):
            bad.write(0, b"evil")
        assert pb.read(0, 4) == payload[:4]
        # two-sided: a message into B's inbox, taken by B's owner
        pb.send(b"hello b")
        assert pb.recv(timeout=30) == b"hello b"
        mesh.mesh_disconnect(conn.id)
        with pytest.raises(Revoked):
            pb.read(0, 4)
    with pytest.raises(errors.NotFound):
        mesh.mesh_get(conn.id)


def test_same_node_uses_shared_memory(mesh):
    a, b = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-a", "team-a")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
    assert conn.transport == "shm" and conn.b.shm_name
    assert conn.data_path == "shm" and "same-host" in conn.fallback_reason
    payload = os.urandom(1 << 20)
    with mesh.mesh_open(conn, side="b") as pb:
        assert type(pb).__name__ == "ShmConnection"
        pb.write(0, payload)
    with mesh.mesh_open(BufferDescriptor.from_proto(conn.b).with_transport("tcp"), secret=conn.secret) as tb:
        assert sha(tb.read(0, 1 << 20)) == sha(payload)    # the agent serves the very same bytes


def test_release_revokes_and_tears_down(mesh):
    a, b = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-b", "team-a")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=64 << 10)
    pa, pb = mesh.mesh_open(conn, side="a"), mesh.mesh_open(conn, side="b")
    pa.write(0, b"a" * 100)
    pb.write(0, b"b" * 100)
    mesh.release(b.id)
    wait_for(lambda: not mesh.mesh_list(slice_id=a.id), 30, "the connection to be torn down")
    for p in (pa, pb):                                       # both sides revoked
        with pytest.raises(Revoked):
            p.read(0, 10)
        p.close()


def test_tenant_isolation_and_grants(mesh):
    a, b = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-b", "team-b")
    with pytest.raises(errors.PermissionDenied):
        mesh.mesh_connect(a.id, b.id, size_bytes=4096)
    mesh.mesh_grant("team-a", "team-b")
    try:
        conn = mesh.mesh_connect(a.id, b.id, size_bytes=4096)
        assert conn.state == 1
        with pytest.raises(errors.PermissionDenied):        # the grant has a direction
            mesh.mesh_connect(b.id, a.id, size_bytes=4096)
    finally:
        mesh.mesh_grant("team-a", "team-b", revoke=True)
    with pytest.raises(errors.InvalidArgument):
        mesh.mesh_connect(a.id, a.id, size_bytes=4096)
    with pytest.raises(errors.InvalidArgument):
        mesh.mesh_connect(a.id, b.id, size_bytes=0)
    with pytest.raises(errors.NotFound):
        mesh.mesh_connect(a.id, "s-nope", size_bytes=4096)


def test_another_tenants_data_plane_and_segment_are_refused_without_the_secret(mesh):
    """Tenant B holds its own connection (and its secret) and knows tenant A's descriptors (what a viewer
    of A's connection sees): neither A's TCP data plane nor A's shm segment opens for it."""
    a1, a2 = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-b", "team-a")
    a3 = slice_on(mesh, "mesh-a", "team-a")
    b1, b2 = slice_on(mesh, "mesh-a", "team-b"), slice_on(mesh, "mesh-b", "team-b")
    ca = mesh.mesh_connect(a1.id, a2.id, size_bytes=64 << 10)            # tcp across nodes
    cs = mesh.mesh_connect(a1.id, a3.id, size_bytes=64 << 10)            # shm on mesh-a
    cb = mesh.mesh_connect(b1.id, b2.id, size_bytes=64 << 10)
    with mesh.mesh_open(ca, side="b") as owner:
        owner.write(0, b"team-a data")
    target = BufferDescriptor.from_proto(ca.b)
    for secret in (cb.secret, b""):     # B's secret, or none: refused at the handshake (the agent's data plane
        with pytest.raises(NotAuthorized):      # takes no channel without a connection's secret)
            connect(target, secret=secret)
    seg = BufferDescriptor.from_proto(cs.b)
    for secret in (b"", cb.secret):
        with pytest.raises(NotAuthorized):
            connect(seg, secret=secret)
    with mesh.mesh_open(ca, side="b") as owner:
        assert owner.read(0, 11) == b"team-a data"


def test_a_tenant_that_shrinks_its_segment_breaks_its_buffer_not_the_agent(cluster, mesh):
    """The segment behind a buffer is its tenant's file. Shrunk, the agent's next TLS access (a peer on
    another host) decrypted into the truncated mapping and the agent died of SIGBUS, taking every other
    tenant's buffers with it; now that buffer answers BufferDamaged and the agent goes on."""
    from mesh.transport import BufferDamaged
    from mesh.transport.tcp import TcpConnection
    a, b = slice_on(mesh, "mesh-a", "team-a"), slice_on(mesh, "mesh-b", "team-a")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
    other = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)          # another buffer on the same agent
    agent = cluster.agents[cluster.agent_for("mesh-b")]
    pid = agent.pid
    fd = os.open(os.path.join("/dev/shm", conn.b.shm_name), os.O_RDWR)   # what the tenant's workload can do
    os.ftruncate(fd, 4096)
    os.close(fd)
    with TcpConnection(BufferDescriptor.from_proto(conn.b), secret=conn.secret, force_tls=True) as tls:
        with pytest.raises(BufferDamaged, match="shrunk to 4096 bytes"):
            tls.write(8192, os.urandom(1 << 19))
        with pytest.raises(BufferDamaged):
            tls.read(0, 100)
    payload = os.urandom(1 << 20)
    with mesh.mesh_open(other, side="b") as ob:
        ob.write(0, payload)
        assert sha(ob.read(0, 1 << 20)) == sha(payload)
    assert agent.running() and agent.pid == pid
    wait_for(lambda: "mesh buffer damaged" in agent.log_tail(200), 30, "the agent's warning about the buffer")
    # the agent reported it: the connection is FAILED with why (it stayed READY), the other one is untouched
    failed = wait_for(lambda: (lambda c: c if c.state == M.MESH_CONNECTION_STATE_FAILED else None)(
        mesh.mesh_get(conn.id)), 30, "the damaged buffer's connection to turn FAILED")
    assert f"buffer {conn.b.buffer_id}" in failed.message and "unusable (shrunk)" in failed.message
    assert mesh.mesh_get(other.id).state == M.MESH_CONNECTION_STATE_READY


# -- RDMA verbs between two agents (the pyverbs stand-in; both nodes in one agent process) -------

IB_HOSTS = [{**h, "node": h["node"].replace("mesh", "ib"),
             "nics": [{"name": "mlx5_0", "kind": "infiniband", "rate_gbps": 400, "gpus": [0]}]} for h in HOSTS]


@pytest.mark.parametrize("verbs_from", ["standin", "device"])
def test_verbs_moves_bytes_by_rdma_on_the_agents_queue_pairs(tmp_path, verbs_from):
    """The stand-in: both nodes in one agent process (its fabric is in-process). The device: one agent
    process per node on this host's RDMA device (its QPs talk through the port's loopback)."""
    if verbs_from == "standin":
        env, per_process = {**os.environ, "GPUMESH_PYVERBS_STANDIN": "tests.unit.fakeverbs:make"}, 2
    else:
        from mesh.transport import verbs
        ok, why = verbs.available()
        if not ok:
            pytest.skip(f"RDMA verbs end to end needs a device: {why} (no RDMA device in this kernel)")
        env, per_process = {k: v for k, v in os.environ.items() if k != "GPUMESH_PYVERBS_STANDIN"}, 1
    c = LocalCluster(tmp_path, IB_HOSTS, lease_ttl=3, agents_per_process=per_process, env=env)
    c.start(timeout=90)
    try:
        c.wait_ready(timeout=60)
        with c.client(timeout=30) as mesh:
            a = slice_on_nodes(mesh, "ib-a", "ib-b")
            b = slice_on_nodes(mesh, "ib-b", "ib-a")
            conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
            assert conn.transport == "verbs" and conn.data_path == "rdma" and conn.fallback_reason == ""
            assert conn.a.qp_num and conn.b.qp_num and conn.a.shm_name
            payload = os.urandom(1 << 20)
            with mesh.mesh_open(conn, side="b") as peer:                 # slice A's side -> B, by RDMA
                assert type(peer).__name__ == "RdmaConnection"
                peer.write(0, payload)
                assert sha(peer.read(0, 1 << 20)) == sha(payload)
            with connect(BufferDescriptor.from_proto(conn.b), secret=conn.secret) as mine:   # B's own segment
                assert sha(mine.read(0, 1 << 20)) == sha(payload)
            log = (c.state_dir / "logs").glob("*.log")
            assert any("verbs queue pair connected" in p.read_text() for p in log)
            mesh.release(b.id)
            wait_for(lambda: not mesh.mesh_list(), 30, "teardown after release")
    finally:
        c.stop()


# -- two hosts in network namespaces -----------------------------------------------------------

NS = ("gpm-a", "gpm-b")
BRIDGE = "gpmbr0"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = _ip("netns", "add", "gpm-probe", check=False)
    if probe.returncode != 0:
        return f"`ip netns add` does not work here: {probe.stderr.strip()}"
    _ip("netns", "del", "gpm-probe", check=False)
    return ""


def _teardown_netns() -> None:
    for ns in NS:
        _ip("netns", "del", ns, check=False)
    _ip("link", "del", BRIDGE, check=False)


@pytest.fixture
def two_hosts():
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    _teardown_netns()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", "10.231.0.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, ns in enumerate(NS):
            _ip("netns", "add", ns)
            _ip("link", "add", f"gpmv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"gpmv{i}", "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"10.231.0.{i + 2}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield [f"10.231.0.{i + 2}" for i in range(len(NS))]
    finally:
        _teardown_netns()


def test_two_agents_in_network_namespaces(two_hosts, tmp_path):
    c = LocalCluster(tmp_path, [{**HOSTS[0], "node": "ns-a"}, {**HOSTS[1], "node": "ns-b"}], lease_ttl=3,
                     agents_per_process=1, controlplane_args=[])
    c.endpoint = "10.231.0.1:0"          # the control plane listens on the bridge, in the root namespace
    c.start_controlplane(60)
    try:
        python = c.python
        for ns, node in zip(NS, ("ns-a", "ns-b")):
            c.python = "ip"               # run the agent process inside its namespace
            proc = c._agent_proc(node)
            proc.argv = ["ip", "netns", "exec", ns, python, *proc.argv[1:]]
            c.agents[node] = proc
            c._spawn(proc)
        c.python = python
        c.wait_ready(60)
        with c.client() as mesh:
            a = slice_on_nodes(mesh, "ns-a", "ns-b")
            b = slice_on_nodes(mesh, "ns-b", "ns-a")
            conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
            assert conn.transport == "tcp"
            assert conn.a.endpoint.startswith(two_hosts[0] + ":") and conn.b.endpoint.startswith(two_hosts[1] + ":")
            # a workload on host A (inside namespace A) writes into B's buffer and reads it back
            assert conn.data_path == "tcp_tls"
            # a workload on host A (inside namespace A) writes into B's buffer over TLS (the certificate pinned
            # from the descriptor) and reads it back; without the secret it is refused
            script = ("import sys, os, hashlib; from gpumesh.v1 import mesh_service_pb2 as M; "
                      "from mesh.meshapi import MeshApi; d = M.BufferDescriptor.FromString(bytes.fromhex(sys.argv[1])); "
                      "p = MeshApi.mesh_open(d, secret=bytes.fromhex(sys.argv[2])); assert p.tls; "
                      "data = os.urandom(1 << 20); p.write(0, data); "
                      "assert p.read(0, 1 << 20) == data; print(hashlib.sha256(data).hexdigest())")
            out = subprocess.run(["ip", "netns", "exec", NS[0], sys.executable, "-c", script,
                                  conn.b.SerializeToString().hex(), conn.secret.hex()], capture_output=True,
                                 text=True, timeout=60, cwd=os.getcwd())
            assert out.returncode == 0, out.stderr
            plain = M.BufferDescriptor()
            plain.CopyFrom(conn.b)
            plain.tls_sha256 = b""
            refused = subprocess.run(["ip", "netns", "exec", NS[0], sys.executable, "-c", script,
                                      plain.SerializeToString().hex(), conn.secret.hex()], capture_output=True,
                                     text=True, timeout=60, cwd=os.getcwd())
            assert refused.returncode != 0 and "requires TLS" in refused.stderr
            with mesh.mesh_open(conn, side="b") as pb:     # and the root namespace sees the same bytes on B
                assert sha(pb.read(0, 1 << 20)) == out.stdout.strip()
            mesh.release(b.id)
            wait_for(lambda: not mesh.mesh_list(), 30, "teardown after release")
    finally:
        c.stop()


def slice_on_nodes(mesh, node: str, other: str):
    mesh.cordon(other)
    try:
        return mesh.allocate(tenant="team-ns", mig_profile="1g.10gb").slices[0]
    finally:
        mesh.uncordon(other)


def test_viewers_and_other_tenants_get_no_secret_on_a_secured_cluster(tmp_path):
    """Real gRPC with tokens and mTLS agents: the secret reaches the slices' owners only."""
    from tests.integration.secure import client, start
    c = start(tmp_path, [{**h, "node": h["node"].replace("mesh", "sec")} for h in HOSTS])
    try:
        with client(c, "team-a") as a, client(c, "viewer-a") as viewer, client(c, "admin") as admin:
            s1 = a.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
            s2 = a.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
            conn = a.mesh_connect(s1.id, s2.id, size_bytes=4096)
            assert len(conn.secret) == 32
            assert a.mesh_get(conn.id).secret == conn.secret                 # the owner
            got, listed = viewer.mesh_get(conn.id), viewer.mesh_list()
            assert got.id == conn.id and got.b.rkey and got.secret == b""     # the viewer sees the record, not the secret
            assert [x.secret for x in listed] == [b""]
            assert admin.mesh_get(conn.id).secret == b""                      # an operator of no slice here
            with pytest.raises((NotAuthorized, InvalidKey)):        # what the viewer saw does not open the buffer
                connect(BufferDescriptor.from_proto(got.b), secret=got.secret).write(0, b"viewer")
            with a.mesh_open(conn, side="b") as mine:                          # the owner's channel works
                mine.write(0, b"owner")
            a.mesh_disconnect(conn.id)
    finally:
        c.stop()
