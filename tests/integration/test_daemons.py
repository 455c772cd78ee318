"""The daemons as an operator meets them: health, reflection, metrics, config errors."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def test_health_reflection_and_metrics(cluster, mesh):
    assert mesh.health() == "serving"
    with grpc.insecure_channel(cluster.endpoint) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"gpumesh.v1.SliceService", "gpumesh.v1.NodeService", "gpumesh.v1.AdminService",
            "grpc.health.v1.Health"} <= services
    a = mesh.allocate(tenant="metrics", mig_profile="1g.10gb", gpu_model="H100-80GB")
    mesh.get_slice(a.slices[0].id)
    with pytest.raises(Exception):
        mesh.mesh_get("c-none")                    # MeshService.Get: an error, a series of its own

    def fresh():
        """A scrape whose fleet gauges are this moment's: the snapshot is taken on the control plane's event loop,
        and one that loop did not answer within its bound (a loaded machine) is served stale, and says so."""
        with urllib.request.urlopen(f"http://{cluster.metrics_endpoint}/metrics", timeout=10) as r:
            got = r.read().decode()
        return got if "gpumesh_metrics_snapshot_stale 0.0" in got else None
    text = wait_for(fresh, 60, "a scrape with a fresh fleet snapshot")
    assert 'gpumesh_slices{state="ready"} 1.0' in text
    assert 'gpumesh_nodes{ready="true"} 2.0' in text
    assert 'gpumesh_grpc_requests_total{code="OK",method="Allocate",service="SliceService"}' in text
    # per-method series carry the service: SliceService.Get and MeshService.Get are not one series
    assert 'gpumesh_grpc_requests_total{code="OK",method="Get",service="SliceService"}' in text
    assert re.search(r'gpumesh_grpc_requests_total\{code="[A-Z_]+",method="Get",service="MeshService"\}', text), text
    assert 'gpumesh_grpc_request_seconds_bucket{le="0.001",method="Get",service="SliceService"}' in text
    # the fleet gauges come from a snapshot taken on the event loop
    assert 'gpumesh_metrics_snapshot_stale 0.0' in text
    assert 'gpumesh_records{kind="slices"}' in text


def run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("args, needle", [
    (["--lease-ttl", "1"], "lease_ttl: 1 is below the minimum 2"),
    (["--log-format", "xml"], "log_format: 'xml' is not allowed (allowed: json, text)"),
    (["--listen", "nowhere"], "listen: 'nowhere' is not HOST:PORT"),
    (["--etcd-endpoints", "127.0.0.1:2379"], "must start with http:// or https://"),
    (["--lease-ttl", "ten"], "lease_ttl (from --lease-ttl): 'ten' is not valid"),
])
def test_controlplane_refuses_bad_config_with_a_clear_message(args, needle):
    res = run("controlplane.main", *args)
    assert res.returncode == 2 and needle in res.stderr, res.stderr


def test_config_file_and_environment_are_validated(tmp_path):
    cfg = tmp_path / "cp.yaml"
    cfg.write_text("lease_ttl: 5\nleese_ttl: 3\n")
    res = run("controlplane.main", "--config", str(cfg))
    assert res.returncode == 2 and "unknown setting 'leese_ttl'" in res.stderr
    import os
    env = dict(os.environ, MESH_CP_LEASE_TTL="0")
    res = run("controlplane.main", env=env)
    assert res.returncode == 2 and "lease_ttl: 0 is below the minimum 2" in res.stderr


def test_agent_refuses_bad_config():
    res = run("nodeagent.main", "--gpu-backend", "sim")
    assert res.returncode == 2 and "sim_host_file" in res.stderr
    res = run("nodeagent.main", "--gpu-backend", "cuda")
    assert res.returncode == 2 and "allowed: nvml, sim" in res.stderr


def test_a_stopped_local_cluster_takes_its_workloads_with_it(tmp_path):
    """Workloads outlive an agent restart (the agent adopts them), not the cluster: `stop` (and `meshctl
    down`) ends them, so a test or demo cluster leaves no model server or job running behind it."""
    from tools.localcluster import LocalCluster
    from mesh.procs import pid_alive
    from tools.localprocs import workload_shims
    c = LocalCluster(tmp_path / "c", [{"node": "wl-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}],
                     log_level="warning")
    c.start(timeout=120)
    try:
        c.wait_ready(timeout=120)
        with c.client() as client:
            s = client.allocate(tenant="wl", mig_profile="1g.10gb").slices[0]
            client.run_workload(s.id, ["sleep", "600"])
        shims = workload_shims(tmp_path / "c")
        assert len(shims) == 1, shims                  # the workload runs under its shim, outside the agent
        c.stop_agent("wl-a", grace=5)
        assert workload_shims(tmp_path / "c") == shims  # an agent that stops leaves it running
    finally:
        c.stop(grace=5)
    assert workload_shims(tmp_path / "c") == []
    assert not any(pid_alive(pid) for pid in shims)
