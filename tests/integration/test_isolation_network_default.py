"""An agent whose default is `workload_network: none` (docs/security.md, Workload networks).

Real etcd, control plane and agent (`--workload-network none`) on one simulated host, and a real
llama.cpp model server (SmolLM2-135M). A workload without a label gets no network; one labelled
`gpumesh.io/network=host` reaches the control plane; a `gpumesh.io/isolation=criu` workload runs on the
host's network (it has no namespaces); a deployment's replica stays on the host's network, so the
gateway's path to it works: a real completion from its endpoint. `none` on a deployment is refused.
"""

from __future__ import annotations

import os
import sys

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors
from tests.integration.conftest import stop_running, wait_for
from tests.integration.serving import completion, h100_hosts, llama_env, need_llama, started_cluster
from tests.integration.serving import module_mesh, smollm2_model  # noqa: F401 - fixtures mesh, smollm2
from tests.integration.test_isolation_network import _no_netns, _probe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500),
              pytest.mark.skipif(bool(_no_netns()), reason=_no_netns() or "-")]
PY = sys.executable
SLOW = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    need_llama()
    with started_cluster(tmp_path_factory, "netdef", h100_hosts(1), env=llama_env(),
                         agent_args=["--workload-stop-grace-seconds", "2", "--workload-network", "none"]) as c:
        yield c
        with c.client() as m:
            stop_running(m)


@pytest.fixture(scope="module")
def slice_a(mesh):
    s = mesh.allocate(tenant="ta", mig_profile="1g.10gb").slices[0]
    yield s
    mesh.release(s.id)


def _cp(cluster) -> dict:
    host, _, port = cluster.endpoint.rpartition(":")
    return {"control-plane": (host, int(port))}


def test_the_node_says_its_default(mesh, cluster):
    node = mesh.get_node("gpu-a")
    assert node.inventory.labels["gpumesh.io/workload-network"] == "none", dict(node.inventory.labels)


def test_without_a_label_a_workload_has_no_network_and_host_asks_for_it(cluster, mesh, slice_a):
    _, res = _probe(mesh, slice_a.id, _cp(cluster), {})
    assert res["control-plane"] != "CONNECTED" and res["interfaces"] == ["lo"] and res["own-loopback"] == "hello"
    _, res = _probe(mesh, slice_a.id, _cp(cluster), {"gpumesh.io/network": "host"})
    assert res["control-plane"] == "CONNECTED" and len(res["interfaces"]) > 1, res


def test_a_criu_workload_runs_on_the_hosts_network(cluster, mesh, slice_a):
    # no mount namespace: the agent's venv (under root's home) is not the tenant's to run, the system's is
    py = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else PY
    w, res = _probe(mesh, slice_a.id, _cp(cluster), {"gpumesh.io/isolation": "criu"}, python=py)
    assert res["control-plane"] == "CONNECTED", res


def test_a_model_server_stays_on_the_hosts_network_and_answers(cluster, mesh, smollm2):
    with pytest.raises(errors.InvalidArgument, match=r"spec.labels\[gpumesh.io/network\]: none is not possible"):
        mesh.deploy("smollm2", name="chat-none", replicas=1, context=512, labels={"gpumesh.io/network": "none"})
    mesh.deploy("smollm2", name="chat", replicas=1, context=512)
    try:
        d = mesh.wait_deployment("chat", lambda d: d.status.ready_replicas == 1, timeout=SLOW)
        r = d.replicas[0]
        w = mesh.get_workload(r.workload_id)
        assert w.state == t.WORKLOAD_STATE_RUNNING and os.readlink(f"/proc/{w.pid}/ns/net") == \
            os.readlink("/proc/self/ns/net")
        assert completion(mesh, r)                  # reached from here, as the gateway reaches it
    finally:
        mesh.undeploy("chat")
        wait_for(lambda: not [d for d in mesh.list_deployments() if d.name == "chat"], 120, "chat to go")
