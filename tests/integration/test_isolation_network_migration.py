"""Checkpoint, restore and live migration of a workload without network (`gpumesh.io/network=none`, and
a live migration with `isolated`).

Such a workload cannot open a TCP connection to anything outside its namespace, yet the cooperative SDK
sends its state over the transfer protocol: to the agent's receiver (checkpoint), from a stored checkpoint
or another node's source into a receiving target (restore, live migration). The agents carry these
transfers through Unix sockets in the workload's own directory (nodeagent/isolation/netrelay.py), so the
same steps work; the run goes on bit-identically to an unmigrated reference, still without network.

Two agent processes (one node each), the control plane and etcd; tools/examples/train_mnist_like.py.
"""

from __future__ import annotations

import base64
import os
import signal

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import types_pb2 as t  # noqa: E402
from mesh.migrationapi import migration_phase  # noqa: E402
from tests.integration.conftest import client_for_test, wait_for, workload_cluster  # noqa: E402
from tests.integration.test_isolation_network import _no_netns  # noqa: E402
from tests.integration.test_migration import (STEPS, TRAIN, alive, check_result, last_step,  # noqa: E402
                                              reference_checksums)
from tests.unit._checkpoint_util import ROOT  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(_no_netns()), reason=_no_netns() or "-")]
HOSTS = [{"node": "nmig-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "nmig-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
KEY = base64.b64encode(bytes(range(32))).decode()
LABELS = {"gpumesh.io/network": "none", "team": "research"}


@pytest.fixture(scope="module")
def reference():
    return reference_checksums(STEPS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("nmig")
    (d / "keys.yaml").write_text(f"sealed: {KEY}\n")
    with workload_cluster(d, HOSTS, agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir",
                                                str(d / "store"), "--checkpoint-keys-file", str(d / "keys.yaml")]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    with client_for_test(cluster) as client:
        yield client


def start_training(mesh, tenant="nmig", labels=LABELS):
    s = mesh.allocate(tenant=tenant, mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)}, labels=labels)
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    wait_for(lambda: last_step(mesh, w.id) >= 10, 60, "training to reach step 10")
    return s, mesh.get_workload(w.id)


def interfaces(pid: int) -> list[str]:
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])


def only_loopback(pid: int) -> bool:
    return interfaces(pid) == ["lo"]


@pytest.mark.parametrize("mode", ["none", "isolated"])
def test_live_migration_of_a_workload_without_network(mesh, reference, mode):
    labels = {**LABELS, "gpumesh.io/network": mode}
    from nodeagent.isolation.bridge import WorkloadBridge
    if mode == "isolated" and WorkloadBridge.problem():
        pytest.skip(f"isolated workloads need a bridge: {WorkloadBridge.problem()}")
    _, w = start_training(mesh, labels=labels)
    expect = ["lo"] if mode == "none" else ["eth0", "lo"]
    assert interfaces(w.pid) == expect and bool(w.network_address) == (mode == "isolated")
    m = mesh.wait_migration(mesh.migrate(w.id).id, timeout=180)
    assert migration_phase(m) == "done", m.message
    assert m.bytes_sent >= m.state_bytes > 0
    moved = wait_for(lambda: (x := mesh.get_workload(w.id)).pid not in (0, w.pid) and x, 30, "the target's pid")
    assert moved.node == m.target_node != w.node and interfaces(moved.pid) == expect
    assert dict(moved.labels) == labels
    wait_for(lambda: not alive(w.pid), 60, "the source process to end")
    check_result(mesh, w.id, reference, started_at=m.step)


def test_checkpoint_and_restore_of_a_workload_without_network(cluster, mesh, reference):
    _, w = start_training(mesh, tenant="sealed")
    ck = mesh.checkpoint(w.id)
    assert ck.encrypted and ck.step >= 10 and ck.bytes > 0
    cluster.kill_agent(w.node)
    os.kill(w.pid, signal.SIGKILL)
    try:
        wait_for(lambda: mesh.get_workload(w.id).state == t.WORKLOAD_STATE_UNKNOWN, 60, "the workload to be UNKNOWN")
        m = mesh.wait_migration(mesh.restore(ck.id).id, timeout=120)
        assert migration_phase(m) == "done", m.message
        assert m.target_node != w.node and m.step == ck.step
        now = wait_for(lambda: (x := mesh.get_workload(w.id)).pid not in (0, w.pid) and x, 30, "the restored pid")
        assert only_loopback(now.pid)
        check_result(mesh, w.id, reference, started_at=ck.step)
    finally:
        cluster.start_agent(w.node)
        cluster.wait_ready(nodes=[w.node], timeout=30)
