"""The live orchestrator on a real local cluster (etcd, the control plane, two agent processes over
simulated H100s): a demand pattern drives warm slices that later allocations claim, and a GPU that
heats up (the simulated NVML's thermal model, driven with simctl) has its workload moved before it
reaches critical. Latencies are printed, never asserted."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh.migrationapi import migration_phase
from tests.integration.conftest import release_all, stop_running, wait_for
from tools.localcluster import LocalCluster

pytestmark = pytest.mark.integration
THERMAL = {"time_constant_s": 120}
HOSTS = [{"node": "orc-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True, "thermal": THERMAL}]},
         {"node": "orc-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True, "thermal": THERMAL}]}]
PROFILE = "1g.10gb"
CRITICAL_C = 85.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("orch")
    c = LocalCluster(d, HOSTS, lease_ttl=3, agents_per_process=1, controlplane_args=[
        "--orchestrator-warm-slices", "--orchestrator-moves",
        "--orchestrator-interval-seconds", "1",
        "--orchestrator-demand-step-seconds", "1", "--orchestrator-warm-lead-seconds", "2",
        "--orchestrator-warm-max-per-key", "2",
        "--orchestrator-load-step-seconds", "1", "--orchestrator-load-horizon-seconds", "15",
        "--orchestrator-move-downtime-seconds", "0.3"],
        agent_args=["--telemetry-interval-seconds", "0.5", "--workload-stop-grace-seconds", "2",
                    "--checkpoint-dir", str(d / "store")])
    c.start(timeout=90)
    yield c
    with c.client() as mesh:
        stop_running(mesh)
    c.stop()


def simctl(cluster, node, *args):
    state = next((cluster.state_dir / "agents").glob(f"*/sim/{node}.state.json"))
    host = cluster.state_dir / "hosts" / f"{node}.yaml"
    subprocess.run([sys.executable, "-m", "nodeagent.nvml.simctl", "--state", str(state), "--host-file", str(host),
                    *args], check=True, capture_output=True, timeout=30)


def meshctl(cluster, *args) -> str:
    return subprocess.run([sys.executable, "-m", "tools.meshctl.main", "--endpoint", cluster.endpoint, *args],
                          check=True, capture_output=True, text=True, timeout=60).stdout


def warm_ready(mesh) -> list:
    return [s for s in mesh.list_slices() if s.labels.get("gpumesh.io/warm") == "true"
            and s.state == t.SLICE_STATE_READY]


def timed_allocate(mesh, tenant):
    t0 = time.perf_counter()
    s = mesh.allocate(tenant=tenant, mig_profile=PROFILE).slices[0]
    return s, time.perf_counter() - t0


def drive_until_warm(mesh) -> list[float]:
    """The pattern: one PROFILE allocation and release at a time, until the orchestrator has enough history to
    forecast it (38 one-second steps at a 2 s lead) and keeps warm slices ready; the cold allocations' latencies."""
    cold: list[float] = []
    deadline = time.monotonic() + 240
    while not warm_ready(mesh):
        assert time.monotonic() < deadline, "no warm slice carved from a steady demand pattern"
        pool = {x.id for x in mesh.list_slices() if x.labels.get("gpumesh.io/warm") == "true"}
        s, dt = timed_allocate(mesh, "pattern")
        if s.id not in pool:
            cold.append(dt)
        mesh.release(s.id)
        time.sleep(0.3)
    return cold


def test_demand_pattern_drives_warm_slices_that_allocations_claim(cluster):
    cluster.wait_ready(timeout=60)
    with cluster.client(timeout=30) as mesh:
        cold = drive_until_warm(mesh)
        for s in warm_ready(mesh):       # owned by no tenant, shown as warm
            assert s.tenant == "" and s.profile == PROFILE and s.device_uuid.startswith("MIG-")
        assert "<warm>" in meshctl(cluster, "get", "slices")
        # The pattern goes on: later allocations claim the warm slices the orchestrator keeps carved.
        claimed, warm_lat = [], []
        for _ in range(8):
            ready = {x.id for x in warm_ready(mesh)}
            s, dt = timed_allocate(mesh, "acme")
            if s.id in ready:
                assert s.tenant == "acme" and s.state == t.SLICE_STATE_READY and not s.labels
                assert s.env["CUDA_VISIBLE_DEVICES"] == s.device_uuid and s.env["GPUMESH_SLICE_ID"] == s.id
                claimed.append(s.id)
                warm_lat.append(dt)
            else:
                cold.append(dt)
            mesh.release(s.id)
            time.sleep(0.3)
        assert claimed, "no allocation claimed a ready warm slice"

        def recorded():     # events are written in batches after the change they record: wait for the last claim's
            events = meshctl(cluster, "get", "events", "-o", "json")
            return "WarmSlicesCreated" in events and "WarmSliceClaimed" in events and \
                all(sid in events for sid in claimed)
        wait_for(recorded, 30, f"the WarmSlicesCreated and WarmSliceClaimed events (claimed {claimed})", interval=1.0)
        print(f"\nAllocate {PROFILE}: cold (NVML creates the instance) median "
              f"{statistics.median(cold) * 1000:.1f} ms over {len(cold)}; warm (claimed) median "
              f"{statistics.median(warm_lat) * 1000:.1f} ms over {len(warm_lat)}")
        release_all(mesh)


def test_a_control_plane_with_warm_slices_off_gives_them_back(cluster):
    """Restarted with the warm-slice rule off, the control plane gives back the warm slices the earlier one carved
    (nothing would claim them or make room where they sit); then it is restarted as it was for the next test."""
    with cluster.client(timeout=30) as mesh:
        drive_until_warm(mesh)
        warm = {s.id for s in mesh.list_slices() if s.labels.get("gpumesh.io/warm") == "true"}
    args = list(cluster.controlplane_args)
    try:
        cluster.controlplane_args = [a for a in args if a != "--orchestrator-warm-slices"]
        cluster.restart_controlplane(timeout=60)
        with cluster.client(timeout=30) as mesh:
            wait_for(lambda: not warm & {s.id for s in mesh.list_slices()}, 60,
                     f"the warm slices {sorted(warm)} given back by a control plane with the rule off")
            assert not [s for s in mesh.list_slices() if s.labels.get("gpumesh.io/warm") == "true"]
        events = meshctl(cluster, "get", "events", "-o", "json")
        assert "warm slices are turned off" in events
    finally:
        cluster.controlplane_args = args
        cluster.restart_controlplane(timeout=60)


def gpu_temp(cluster, node) -> float:
    out = meshctl(cluster, "get", "gpus", "-o", "json")
    return next(g["temperature_c"] for g in json.loads(out)["items"] if g["node"] == node)


def test_a_heating_gpu_has_its_workload_moved_before_critical(cluster):
    pytest.importorskip("torch", reason="the migrated workload is a PyTorch loop (pip install 'gpumesh[torch]')")
    from tests.unit._checkpoint_util import ROOT
    cluster.wait_ready(timeout=60)
    with cluster.client(timeout=30) as mesh:
        s = mesh.allocate(tenant="train", mig_profile="1g.20gb").slices[0]
        train = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "1000000", "--sleep-ms", "20",
                 "--print-every", "50"]
        w = mesh.run_workload(s.id, train, env={"PYTHONPATH": str(ROOT)})
        assert w.state == t.WORKLOAD_STATE_RUNNING
        hot = s.node
        simctl(cluster, hot, "heat", "--gpu", "0", "--extra-c", "70")     # poor cooling: heats up over minutes
        readings: list[float] = []

        def moved():
            readings.append(gpu_temp(cluster, hot))
            return mesh.list_migrations(workload_id=w.id)
        migrations = wait_for(moved, 300, "the orchestrator to move the workload", interval=0.5)
        temp_when_seen = readings[-1]
        m = migrations[0]
        assert m.source_node == hot and m.target_node != hot and m.reason.startswith("orchestrator:")
        assert temp_when_seen < CRITICAL_C, f"moved only at {temp_when_seen} C"
        # the decision's own record: the reading then was below critical and the forecast's upper edge above
        now_c = float(re.search(r"now ([0-9.]+)C", m.reason).group(1))
        upper = float(re.search(r"\[[0-9.]+, ([0-9.]+)\]", m.reason).group(1))
        assert now_c < CRITICAL_C <= upper, m.reason
        wait_for(lambda: migration_phase(mesh.get_migration(m.id)) in ("done", "aborted"), 180,
                 "the migration to finish")
        assert migration_phase(mesh.get_migration(m.id)) == "done", mesh.get_migration(m.id).message
        assert mesh.get_workload(w.id).node != hot
        print(f"\nmoved at {now_c:.1f} C (forecast upper edge {upper:.1f} C within 15 s); temperatures seen: "
              f"{[round(x, 1) for x in readings[-5:]]}")
        # describe shows the forecasts that matter for the node and the slice (ForecastService's)
        text = meshctl(cluster, "describe", "node", hot)
        assert "Forecasts:" in text and f"gpu/{hot}/0" in text and "temperature" in text
        print("\n" + text[text.index("Forecasts:"):])
        moved_slice = mesh.get_workload(w.id).slice_id
        doc = json.loads(meshctl(cluster, "describe", "slice", moved_slice, "-o", "json"))
        assert {r["metric"] for r in doc["forecasts"]} >= {"temperature", "memory_used", "requests"}
        simctl(cluster, hot, "clear", "--gpu", "0")
        stop_running(mesh)
        release_all(mesh)
