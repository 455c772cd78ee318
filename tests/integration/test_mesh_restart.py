"""A mesh connection survives its agents: real etcd, control plane and agent processes; the agent of one
side is SIGKILLed and started again, and the SAME connection (same id, same secret) moves bytes again,
with the bytes written before the kill still there (the buffers are shared memory segments, which outlive
the agent process). Also across a control plane restart while an agent is down."""

from __future__ import annotations

import os

import pytest

from gpumesh.v1 import mesh_service_pb2 as M
from mesh import errors
from mesh.transport import PeerGone
from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

READY = M.MESH_CONNECTION_STATE_READY
HOSTS = [
    {"node": "mr-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
    {"node": "mr-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("meshrestart"), HOSTS, lease_ttl=3, agents_per_process=1)
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


def slice_on(mesh, node: str):
    others = [n for n in ("mr-a", "mr-b") if n != node]
    for n in others:
        mesh.cordon(n)
    try:
        return mesh.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
    finally:
        for n in others:
            mesh.uncordon(n)


def restart_agent(cluster, node: str) -> None:
    cluster.kill_agent(node)                      # SIGKILL: nothing is deregistered
    cluster.start_agent(node)
    cluster.wait_ready(nodes=[node], timeout=60)


def recovered(mesh, conn, side: str):
    """The connection once READY again with the restarted side's new data plane."""
    def check():
        c = mesh.mesh_get(conn.id)
        old = conn.a if side == "a" else conn.b
        new = c.a if side == "a" else c.b
        return c if c.state == READY and new.endpoint != old.endpoint else None
    return wait_for(check, 90, f"connection {conn.id} to be READY again after the agent restart")


def test_tcp_connection_carries_bytes_again_after_its_agent_is_killed(cluster, mesh):
    a, b = slice_on(mesh, "mr-a"), slice_on(mesh, "mr-b")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
    assert conn.transport == "tcp"
    before_a, before_b = os.urandom(1 << 20), os.urandom(4096)
    with mesh.mesh_open(conn, side="a") as pa, mesh.mesh_open(conn, side="b") as pb:
        pa.write(0, before_a)                      # slice b's workload writes into a's buffer
        pb.write(100, before_b)
        assert pa.read(0, 1 << 20) == before_a

    restart_agent(cluster, "mr-a")
    with pytest.raises(PeerGone):                  # the old descriptor names the dead data plane
        with mesh.mesh_open(conn, side="a") as stale:
            stale.read(0, 1)
    after = recovered(mesh, conn, "a")
    assert after.id == conn.id and after.secret == conn.secret
    assert after.a.buffer_id == conn.a.buffer_id and after.b == conn.b     # the other side did not change
    with mesh.mesh_open(after, side="a") as pa, mesh.mesh_open(after, side="b") as pb:
        assert pa.read(0, 1 << 20) == before_a     # written before the kill, in memory that outlived the agent
        assert pb.read(100, 4096) == before_b
        pa.write(10, b"after the restart")
        pb.write(0, b"both ways")
        assert pa.read(10, 17) == b"after the restart" and pb.read(0, 9) == b"both ways"
        pa.send(b"hello a")                         # two-sided: into A's inbox on the restarted data plane
        assert pa.recv(timeout=30) == b"hello a"
    assert [c.id for c in mesh.mesh_list()] == [conn.id]



def test_a_reconnecting_buffer_rides_through_its_agents_restart(cluster, mesh):
    """The SDK path (mesh_open(..., reconnect=True)): the same open buffer carries on after its agent was
    killed and started again; nobody calls mesh_get or mesh_open by hand."""
    import threading
    a, b = slice_on(mesh, "mr-a"), slice_on(mesh, "mr-b")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=1 << 20)
    assert conn.transport == "tcp"
    payload = os.urandom(1 << 20)
    with mesh.mesh_open(conn, side="a", reconnect=True, recover_timeout=300) as pa:
        pa.write(0, payload)
        cluster.kill_agent("mr-a")
        got: dict = {}

        def read() -> None:
            try:
                got["bytes"] = pa.read(0, 1 << 20)
            except BaseException as e:      # handed to the test's thread below
                got["error"] = e
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: pa.waiting_since is not None or got, 60, "the read to wait for the connection's recovery")
        assert not got, got                 # it waits instead of raising PeerGone
        cluster.start_agent("mr-a")
        cluster.wait_ready(nodes=["mr-a"], timeout=60)
        reader.join(timeout=300)
        assert not reader.is_alive() and "error" not in got, got
        assert got["bytes"] == payload      # the bytes written before the kill, through the same object
        assert pa.reopens == 1
        after = mesh.mesh_get(conn.id)
        assert after.id == conn.id and after.secret == conn.secret and after.state == READY
        assert pa.connection.a.endpoint == after.a.endpoint != conn.a.endpoint
        pa.write(10, b"after the restart")
        pa.send(b"hello a")
        assert pa.recv(timeout=30) == b"hello a" and pa.recv(timeout=0) is None
    with mesh.mesh_open(after, side="a") as fresh:
        assert fresh.read(10, 17) == b"after the restart"


def test_shm_mapping_survives_and_the_connection_recovers_across_a_control_plane_restart(cluster, mesh):
    a, b = slice_on(mesh, "mr-b"), slice_on(mesh, "mr-b")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=64 << 10)
    assert conn.transport == "shm"
    payload = os.urandom(64 << 10)
    mapped = mesh.mesh_open(conn, side="b")        # a workload's mapping, kept open through the restarts
    try:
        assert type(mapped).__name__ == "ShmConnection"
        mapped.write(0, payload)
        cluster.kill_agent("mr-b")
        with pytest.raises(PeerGone):              # while no agent owns it
            mapped.read(0, 1)
        cluster.restart_controlplane(kill=True, wait_ready=False)    # the control plane restarts meanwhile
        cluster.start_agent("mr-b")
        cluster.wait_ready(timeout=90)
        after = recovered(mesh, conn, "b")
        assert after.id == conn.id and after.secret == conn.secret
        assert after.b.rkey == conn.b.rkey and after.b.shm_name == conn.b.shm_name
        assert mapped.read(0, 64 << 10) == payload         # the same mapping works again, with the same bytes
        mapped.write(5, b"still mapped")
        with mesh.mesh_open(after, side="b") as fresh:
            assert fresh.read(5, 12) == b"still mapped"
    finally:
        mapped.close()


# -- RDMA verbs (the pyverbs stand-in: its fabric is in-process, so both nodes run in one agent process and a
# kill restarts both agents) -------------------------------------------------------------------------------

IB_HOSTS = [{**h, "node": h["node"].replace("mr", "ibr"),
             "nics": [{"name": "mlx5_0", "kind": "infiniband", "rate_gbps": 400, "gpus": [0]}]} for h in HOSTS]


def test_verbs_connection_gets_new_queue_pairs_after_the_agents_are_killed(tmp_path):
    env = {**os.environ, "GPUMESH_PYVERBS_STANDIN": "tests.unit.fakeverbs:make"}
    c = LocalCluster(tmp_path, IB_HOSTS, lease_ttl=3, agents_per_process=2, env=env)
    c.start(timeout=90)
    try:
        c.wait_ready(timeout=60)
        with c.client(timeout=30) as mesh:
            slices = {}
            for node, other in (("ibr-a", "ibr-b"), ("ibr-b", "ibr-a")):
                mesh.cordon(other)
                try:
                    slices[node] = mesh.allocate(tenant="team-a", mig_profile="1g.10gb").slices[0]
                finally:
                    mesh.uncordon(other)
            conn = mesh.mesh_connect(slices["ibr-a"].id, slices["ibr-b"].id, size_bytes=1 << 20)
            assert conn.transport == "verbs" and conn.data_path == "rdma"
            payload = os.urandom(1 << 20)
            with mesh.mesh_open(conn, side="b") as peer:                 # A -> B by RDMA
                peer.write(0, payload)
            c.kill_agent("ibr-a")                                      # the one process of both nodes
            c.start_agent("ibr-a")
            c.wait_ready(timeout=60)

            def ready():
                got = mesh.mesh_get(conn.id)
                return got if got.state == READY and got.a.qp_num != conn.a.qp_num else None
            after = wait_for(ready, 90, "the verbs connection to be READY with new queue pairs")
            assert after.id == conn.id and after.secret == conn.secret and after.data_path == "rdma"
            assert after.b.qp_num != conn.b.qp_num        # new QPs on both sides (keys may repeat in a new process)
            with mesh.mesh_open(after, side="b") as peer:
                assert type(peer).__name__ == "RdmaConnection"
                assert peer.read(0, 1 << 20) == payload                  # written by RDMA before the kill
                peer.write(0, b"by RDMA again")
            with mesh.mesh_open(after, side="a") as back:
                back.write(3, b"and back")
            with mesh.mesh_open(after, side="b") as peer, mesh.mesh_open(after, side="a") as back:
                assert peer.read(0, 13) == b"by RDMA again" and back.read(3, 8) == b"and back"
            logs = "".join(p.read_text() for p in (c.state_dir / "logs").glob("*.log"))
            assert "mesh buffer recovered" in logs and "mesh connection recovered" in logs
            mesh.mesh_disconnect(after.id)           # revoked: the segments (which outlive agents) are unlinked
            assert not os.path.exists("/dev/shm/" + after.a.shm_name)
    finally:
        c.stop()


MAKE_SEGMENT = """
import os, sys
from mesh.transport.shm import ShmRegion
ShmRegion(sys.argv[1], 4096, 7, b"s" * 32, outlive_process=True, owner=bytes.fromhex(sys.argv[2]))
os.kill(os.getpid(), 9)
"""


def test_a_restarted_agent_removes_the_segments_its_killed_run_left_unrecorded(cluster, mesh, tmp_path):
    """A segment made by an agent killed before it wrote the buffer's record stayed in /dev/shm for good; the
    agent's next start removes it (WARNING), and neither a live connection's segments nor another agent's."""
    import subprocess
    import sys

    from mesh.transport.shm import PREFIX, owner_tag, segment_exists, unlink_segment
    a, b = slice_on(mesh, "mr-a"), slice_on(mesh, "mr-b")
    conn = mesh.mesh_connect(a.id, b.id, size_bytes=4096)
    records = next((cluster.state_dir / "agents").glob("*/mesh/mr-a"))      # the agent's records directory
    tag = os.urandom(4).hex()
    orphan, foreign = f"b-m-{tag}o-{a.id}", f"b-m-{tag}f-{a.id}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "proto")])}
    for bid, owner in ((orphan, owner_tag("mr-a", str(records))), (foreign, owner_tag("mr-a", str(tmp_path)))):
        p = subprocess.run([sys.executable, "-c", MAKE_SEGMENT, bid, owner.hex()], env=env, timeout=60)
        assert p.returncode == -9 and segment_exists(PREFIX + bid)
    try:
        restart_agent(cluster, "mr-a")
        agent = cluster.agents[cluster.agent_for("mr-a")]
        wait_for(lambda: "mesh segment left by a killed run of this agent removed" in agent.log_tail(300), 60,
                 "the restarted agent's warning about the orphan segment")
        assert not segment_exists(PREFIX + orphan)
        assert segment_exists(PREFIX + foreign)                     # another agent's (another state directory)
        after = recovered(mesh, conn, "a")                          # the live buffer's segment was kept
        with mesh.mesh_open(after, side="a") as pa:
            pa.write(0, b"still here")
            assert pa.read(0, 10) == b"still here"
    finally:
        unlink_segment(PREFIX + orphan)
        unlink_segment(PREFIX + foreign)
