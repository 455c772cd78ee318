"""Retiring a node for good on a real local cluster (etcd, the control plane and agent processes over simulated
GPUs): `meshctl delete node` of a node whose agent is stopped ends its allocations, workloads and mesh connections
and removes it from `get nodes`; its agent, started again, registers as a new node and tears down what it still held."""

from __future__ import annotations

import json
import sys
import time

import pytest

from gpumesh.v1 import types_pb2 as T
from mesh import errors
from mesh.procs import pid_alive
from tests.integration.conftest import wait_for, workload_cluster

pytestmark = pytest.mark.integration
KEEP, GONE = "nd-keep", "nd-gone"
HOSTS = [{"node": KEEP, "gpus": [{"model": "L4", "count": 1, "mig": False}]},
         {"node": GONE, "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with workload_cluster(tmp_path_factory.mktemp("nodedel"), HOSTS,
                          agent_args=["--workload-stop-grace-seconds", "2"]) as c:
        yield c


def mig_instances(cluster, node: str) -> list:
    """The GPU instances the simulated GPU of `node` holds (its NVML state file, as the agent leaves it)."""
    state = json.loads((cluster.state_dir / "agents" / node / "sim" / f"{node}.state.json").read_text())
    return [gi for gpu in state["gpus"] for gi in gpu["gis"]]


def meshctl(cluster, capsys, *argv: str) -> tuple[int, str, str]:
    from tools.meshctl.main import main
    capsys.readouterr()
    rc = main([*argv, "--endpoint", cluster.endpoint])
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_delete_a_notready_node_and_its_agent_comes_back_as_a_new_node(cluster, capsys):
    cluster.wait_ready(timeout=60)
    with cluster.client(timeout=30) as mesh:
        gang = mesh.allocate(tenant="t", gpu_model="H100-80GB", mig_profile="1g.10gb", count=2)
        other = mesh.allocate(tenant="t", gpu_model="H100-80GB", mig_profile="2g.20gb")
        kept = mesh.allocate(tenant="t", gpu_model="L4", memory_bytes=1 << 30, compute_share=0.2, isolation="mps")
        assert {s.node for s in [*gang.slices, *other.slices]} == {GONE}
        w = mesh.run_workload(gang.slices[0].id, [sys.executable, "-c", "import time; time.sleep(600)"])
        w = wait_for(lambda: (x := mesh.get_workload(w.id)).state == T.WORKLOAD_STATE_RUNNING and x, 60,
                     "the workload to run")
        assert len(mig_instances(cluster, GONE)) == 3
        conn = mesh.mesh_connect(other.slices[0].id, kept.slices[0].id, 4096)      # a buffer on each node

        # READY: refused, naming the node and what to do
        rc, out, err = meshctl(cluster, capsys, "delete", "node", GONE)
        assert rc != 0 and GONE in err and "drain it and stop its agent first" in err

        cluster.stop_agent(GONE, grace=5)          # the host is retired: its agent stops (the workload outlives it)
        wait_for(lambda: mesh.get_node(GONE).state == T.NODE_STATE_NOT_READY, 60, "the node to turn NotReady")

        rc, out, err = meshctl(cluster, capsys, "delete", "node", GONE, "-o", "json")
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["node"]["name"] == GONE and doc["node"]["deleting"]
        assert sorted(doc["slices"]) == sorted(s.id for s in [*gang.slices, *other.slices])
        assert sorted(doc["allocations"]) == sorted([gang.allocation_id, other.allocation_id])
        assert doc["workloads"] == [w.id] and doc["connections"] == [conn.id]

        assert GONE not in [n.name for n in mesh.list_nodes()]
        rc, out, err = meshctl(cluster, capsys, "get", "nodes")
        assert rc == 0 and GONE not in out and KEEP in out
        assert [s.id for s in mesh.list_slices()] == [kept.slices[0].id]
        ended = mesh.get_workload(w.id)
        assert (ended.state, ended.message) == (T.WORKLOAD_STATE_FAILED, f"node {GONE} deleted")
        with pytest.raises(errors.NotFound):                 # disconnected: the peer's buffer revoked
            mesh.mesh_get(conn.id)
        with pytest.raises(errors.NotFound):                 # a retry: the node is gone
            mesh.delete_node(GONE)
        wait_for(lambda: mesh.list_events("Node", GONE, reason="NodeDeleted"), 30, "the NodeDeleted event")

        deleted_at = time.time()
        cluster.start_agent(GONE)                 # the agent comes back: a new node, nothing of the old one
        cluster.wait_ready(timeout=90)
        fresh = mesh.get_node(GONE)
        assert fresh.registered_at.seconds >= int(deleted_at) - 1 and not fresh.deleting and fresh.slices == 0
        wait_for(lambda: not mig_instances(cluster, GONE), 60, "the old MIG instances to be torn down")
        wait_for(lambda: not pid_alive(w.pid), 60, "the old workload's process to be stopped")
        assert mesh.get_workload(w.id).state == T.WORKLOAD_STATE_FAILED          # its report changed nothing
        whole = mesh.allocate(tenant="t", gpu_model="H100-80GB", mig_profile="7g.80gb")   # the whole GPU is free
        assert whole.slices[0].node == GONE and whole.slices[0].state == T.SLICE_STATE_READY
        assert sorted(s.id for s in mesh.list_slices()) == sorted([kept.slices[0].id, whole.slices[0].id])
        mesh.release(whole.allocation_id)
        mesh.release(kept.allocation_id)
