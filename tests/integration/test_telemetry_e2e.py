"""Telemetry end to end: the simulated GPUs' load, heat and XIDs (driven from
outside with simctl, as a test harness would) reach the control plane, move
pressure, thermal state and health, change where new slices go, and show in
meshctl."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import wait_for
from tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration
HOST = {"node": "tele-1", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]}


@pytest.fixture(scope="module")
def tcluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("tele")
    # No automatic reset here, so an unhealthy GPU stays out until `meshctl gpu clear` (the reset
    # path is tests/integration/test_gpu_health.py).
    (d / "health.yaml").write_text("recovery: false\n")
    c = LocalCluster(d, [HOST], lease_ttl=3, controlplane_args=["--health-policy", str(d / "health.yaml")],
                     agent_args=["--telemetry-interval-seconds", "0.5"])
    c.start(timeout=90)
    yield c
    c.stop()


def simctl(cluster, *args):
    state = next((cluster.state_dir / "agents").glob("*/sim/tele-1.state.json"))
    host = cluster.state_dir / "hosts" / "tele-1.yaml"
    subprocess.run([sys.executable, "-m", "nodeagent.nvml.simctl", "--state", str(state), "--host-file", str(host),
                    *args], check=True, capture_output=True, timeout=30)


def gpus(cluster) -> dict[int, dict]:
    out = subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint,
                          "get", "gpus", "-o", "json"], check=True, capture_output=True, text=True, timeout=30)
    return {g["index"]: g for g in json.loads(out.stdout)["items"]}


def test_telemetry_visible_and_pressure_moves_placement(tcluster):
    g = wait_for(lambda: (lambda d: d if d[0]["utilization"] is not None else None)(gpus(tcluster)), 60,
                 "first telemetry")
    for key in ("utilization", "memory_used_bytes", "memory_total_bytes", "temperature_c", "power_w",
                "memory_pressure", "thermal_state", "health"):
        assert g[0][key] is not None, key
    assert g[0]["health"] == "healthy" and g[0]["memory_pressure"] == "low"
    with tcluster.client() as mesh:
        simctl(tcluster, "load", "--gpu", "0", "--util", "90", "--memory-used", "72GiB")
        wait_for(lambda: gpus(tcluster)[0]["memory_pressure"] == "critical", 60, "critical memory pressure")
        for _ in range(3):      # no new slice on a critical GPU
            assert mesh.allocate(tenant="t", mig_profile="1g.10gb").slices[0].gpu_index == 1
        simctl(tcluster, "clear", "--gpu", "0")
        simctl(tcluster, "heat", "--gpu", "1", "--celsius", "90")
        wait_for(lambda: gpus(tcluster)[1]["thermal_state"] == "critical", 60, "a critical GPU temperature")
        wait_for(lambda: gpus(tcluster)[0]["memory_pressure"] == "low", 60, "pressure to fall")
        assert mesh.allocate(tenant="t", mig_profile="1g.10gb").slices[0].gpu_index == 0
        simctl(tcluster, "clear", "--gpu", "1")
        for s in mesh.list_slices():
            mesh.release(s.id)


def meshctl(cluster, *args):
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                          check=True, capture_output=True, text=True, timeout=30).stdout


def test_xid_makes_a_gpu_unhealthy_until_cleared(tcluster):
    with tcluster.client() as mesh:
        simctl(tcluster, "xid", "--gpu", "1", "--code", "48")
        wait_for(lambda: gpus(tcluster)[1]["health"] == "unhealthy", 60, "GPU 1 unhealthy")
        # the health changes in memory first; the GpuUnhealthy record follows the health's etcd write: wait for it

        def recorded():
            reasons = [(e.reason, e.gpu_index) for e in mesh.get_node("tele-1").events]
            return ("XidError", 1) in reasons and ("GpuUnhealthy", 1) in reasons
        wait_for(recorded, 30, "the XidError and GpuUnhealthy events of GPU 1")
        s = mesh.allocate(tenant="t", mig_profile="7g.80gb").slices[0]
        assert s.gpu_index == 0                               # the unhealthy GPU takes nothing
        simctl(tcluster, "xid", "--gpu", "0", "--code", "13")   # application class by the default policy
        wait_for(lambda: any(e.reason == "XidError" and e.gpu_index == 0 for e in mesh.get_node("tele-1").events),
                 20, "the application-class XID event")
        assert gpus(tcluster)[0]["health"] == "healthy"
        assert gpus(tcluster)[1]["health"] == "unhealthy"       # no timer brings it back (recovery is off)
        from mesh import errors
        with pytest.raises(errors.NotFound, match="gpu_index"):
            mesh.clear_gpu_quarantine("tele-1", 7)
        with pytest.raises(errors.FailedPrecondition, match="healthy"):
            mesh.clear_gpu_quarantine("tele-1", 0)
        out = meshctl(tcluster, "gpu", "clear", "tele-1", "1")
        assert "gpu/tele-1/1 cleared: healthy" in out
        assert gpus(tcluster)[1]["health"] == "healthy"
        assert mesh.allocate(tenant="t", mig_profile="7g.80gb").slices[0].gpu_index == 1
        for x in mesh.list_slices():
            mesh.release(x.id)
