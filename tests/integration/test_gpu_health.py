"""GPU health end to end (docs/operations.md, "GPU health"): faults injected through the simulated
NVML's fault surface (the agent reads them through NVML's event API and memory-repair calls, as on a
GPU host) reach the control plane's health policy, with real etcd, agent processes and workloads.

* a fatal XID (48, double-bit ECC: the reset class) on the GPU of a running SDK-checkpointable
  workload has the workload running on another GPU (live migration), then the idle GPU is reset
  by its agent and returns to service; the time from the XID to the workload running elsewhere is
  printed (the test asserts the outcome, never the time);
* 1,000 transient faults (application-class XIDs, and bursts of reset-class ones that a reset
  clears) leave no GPU out of service.
"""

from __future__ import annotations

import base64
import sys
import time

import pytest

pytest.importorskip("torch", reason="torch is not installed (pip install 'gpumesh[torch]')")

from gpumesh.v1 import types_pb2 as t  # noqa: E402
from tests.integration.conftest import (client_for_test, json_lines, release_all, stop_running,  # noqa: E402
                                        wait_for, workload_cluster)
from tests.unit._checkpoint_util import ROOT  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]   # generous waits, never a time bound
HOSTS = [{"node": "hl-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "hl-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
TRAIN = [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "3000", "--sleep-ms", "20",
         "--print-every", "5"]
KEY = base64.b64encode(bytes(range(32))).decode()
APPLICATION = (13, 31, 43, 45, 68, 109)
RESET_BURST = (48, 63, 94)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("health")
    (d / "keys.yaml").write_text(f"hl: {KEY}\n")
    with workload_cluster(d, HOSTS, controlplane_args=["--node-events-kept", "5000"],
                          agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir", str(d / "store"),
                                      "--checkpoint-keys-file", str(d / "keys.yaml"),
                                      "--telemetry-interval-seconds", "0.5"]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    with client_for_test(cluster, stop_workloads=True) as client:
        yield client


def nvml_of(cluster, node):
    """The node's simulated NVML (its state file), as simctl drives it from outside."""
    from nodeagent.nvml.sim import SimNvml
    state = next((cluster.state_dir / "agents").glob(f"*/sim/{node}.state.json"))
    return SimNvml(cluster.state_dir / "hosts" / f"{node}.yaml", state)


def health(mesh, node, index=0) -> str:
    g = next(x for x in mesh.list_gpus(node) if x.gpu.index == index)
    return t.GpuHealth.Name(g.telemetry.health).removeprefix("GPU_HEALTH_").lower()


def reasons(mesh, node) -> list[str]:
    return [e.reason for e in mesh.get_node(node).events]


def last_step(mesh, wid) -> int:
    return max((d.get("step", 0) for d in json_lines(mesh, wid)), default=0)


def test_fatal_xid_moves_the_workload_then_the_gpu_is_reset_and_returns(cluster, mesh):
    s = mesh.allocate(tenant="hl", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
    wait_for(lambda: last_step(mesh, w.id) >= 10, 90, "training to reach step 10")
    src = mesh.get_workload(w.id).node
    step0 = last_step(mesh, w.id)

    t0 = time.monotonic()
    nvml_of(cluster, src).sim_inject_xid(s.gpu_index, 48)        # double-bit ECC: the reset class

    def running_elsewhere():
        x = mesh.get_workload(w.id)
        return x.node != src and x.state == t.WORKLOAD_STATE_RUNNING and last_step(mesh, w.id) > step0
    wait_for(running_elsewhere, 240, "the workload to run on a healthy GPU")
    elapsed = time.monotonic() - t0
    print(f"\nXID 48 -> workload {w.id} running on another GPU ({mesh.get_workload(w.id).node}) "
          f"after {elapsed:.1f} s (goal: 60 s)")
    ev = reasons(mesh, src)
    assert "XidError" in ev and "GpuUnhealthy" in ev and "GpuWorkloadMigrating" in ev
    migs = [m for m in mesh.list_migrations(workload_id=w.id)]
    assert migs and "XID 48" in migs[-1].reason
    # the same story in the durable event stream: the GPU's health, the migration's phases
    # (written by the event recorder in a batch after the node's own record: wait for them)
    wait_for(lambda: {"XidError", "GpuUnhealthy", "GpuWorkloadMigrating"} <= {e.reason for e in mesh.list_events(
        kind="Gpu", name=f"{src}/{s.gpu_index}")}, 60, "the GPU's health events in the durable stream")
    wait_for(lambda: {"MigrationPlanned", "MigrationDone"} <= {e.reason for e in mesh.list_events(
        kind="Migration", name=migs[-1].id)}, 60, "the migration's phase events")
    # the source GPU, idle now, is reset by its agent and comes back on clean readings
    wait_for(lambda: "GpuRecovered" in reasons(mesh, src), 120, "the GPU to be reset and return")
    ev = reasons(mesh, src)
    assert ev.index("GpuResetRequested") < ev.index("GpuReset") < ev.index("GpuRecovered")
    assert health(mesh, src) == "healthy"
    rows = nvml_of(cluster, src)
    rows.nvmlInit()
    try:
        assert rows.nvmlDeviceGetRemappedRows(rows.nvmlDeviceGetHandleByIndex(0))[2] == 0   # applied by the reset
    finally:
        rows.nvmlShutdown()
    # it takes slices again
    wait_for(lambda: all(health(mesh, n) == "healthy" for n in ("hl-a", "hl-b")), 30, "both GPUs healthy")


def test_a_gpu_off_the_bus_moves_the_workload_and_returns_when_the_node_brings_it_back(cluster, mesh):
    s = mesh.allocate(tenant="hl", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
    wait_for(lambda: last_step(mesh, w.id) >= 10, 90, "training to reach step 10")
    src = mesh.get_workload(w.id).node
    step0 = last_step(mesh, w.id)
    asked = reasons(mesh, src).count("GpuResetRequested")
    sim = nvml_of(cluster, src)
    t0 = time.monotonic()
    sim.sim_inject_xid(s.gpu_index, 79)                 # fallen off the bus: the reboot class

    def running_elsewhere():
        x = mesh.get_workload(w.id)
        return x.node != src and x.state == t.WORKLOAD_STATE_RUNNING and last_step(mesh, w.id) > step0
    wait_for(running_elsewhere, 240, "the workload to run on a healthy GPU")
    print(f"\nXID 79 -> workload {w.id} running on another GPU after {time.monotonic() - t0:.1f} s")
    wait_for(lambda: health(mesh, src) == "lost", 30, "the GPU to be lost")
    assert reasons(mesh, src).count("GpuResetRequested") == asked      # a GPU off the bus is not reset
    sim.sim_clear(s.gpu_index)                          # the node brings it back (reseat / reboot)
    wait_for(lambda: health(mesh, src) == "healthy", 60, "the GPU back in service")
    # the health changes in memory first, the GpuRecovered record follows the health's etcd write: wait for it
    wait_for(lambda: "GpuRecovered" in reasons(mesh, src), 30, "the GpuRecovered event")


def test_a_thousand_transient_faults_leave_no_gpu_out_of_service(cluster, mesh):
    nodes = [h["node"] for h in HOSTS]
    sims = {n: nvml_of(cluster, n) for n in nodes}
    before = {n: reasons(mesh, n).count("XidError") for n in nodes}
    plan: list[tuple[str, int]] = []
    for n in nodes:                                 # one burst of the reset class per GPU: one incident
        plan += [(n, code) for code in RESET_BURST]
    k = 0
    while len(plan) < 1000:
        plan.append((nodes[k % 2], APPLICATION[k % len(APPLICATION)]))
        k += 1
    plan.sort(key=lambda p: p[1] in RESET_BURST)    # the application faults first, then the bursts
    sent = {n: 0 for n in nodes}
    for i in range(0, len(plan), 100):              # NVML keeps a bounded event log: deliver in batches
        batch = plan[i:i + 100]
        for node, code in batch:
            if code not in RESET_BURST:
                sims[node].sim_inject_xid(0, code)
            sent[node] += 1
        for n in nodes:                             # a fault's burst at one instant, as the driver logs it
            burst = [code for node, code in batch if node == n and code in RESET_BURST]
            if burst:
                sims[n].sim_inject_xids(0, burst)
        wait_for(lambda: all(reasons(mesh, n).count("XidError") - before[n] >= sent[n] for n in nodes), 120,
                 f"the control plane to see {i + 100} faults")
    assert len(plan) == 1000 and sum(sent.values()) == 1000
    # every GPU comes back (the bursts are reset away) and none is left out of service
    wait_for(lambda: all(reasons(mesh, n).count("GpuRecovered") >= 1 for n in nodes), 120, "the resets")
    wait_for(lambda: all(health(mesh, n) == "healthy" for n in nodes), 60, "every GPU healthy")
    for n in nodes:
        assert "GpuQuarantined" not in reasons(mesh, n)
    s = mesh.allocate(tenant="hl", mig_profile="7g.80gb", count=2).slices
    assert sorted(x.node for x in s) == nodes        # both GPUs take slices again
    print(f"\n1000 transient faults ({sum(1 for _, c in plan if c in RESET_BURST)} of the reset class): "
          f"GPU health {[health(mesh, n) for n in nodes]}")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    d = tmp_path_factory.mktemp("health1")
    with workload_cluster(d, [{"node": "hl-solo", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]}],
                          agent_args=["--workload-stop-grace-seconds", "2",
                                      "--telemetry-interval-seconds", "0.5"]) as c:
        yield c


def test_with_no_other_node_the_workload_moves_to_a_healthy_gpu_of_its_node(one_node):
    with one_node.client(timeout=30) as mesh:
        s = mesh.allocate(tenant="hl", mig_profile="1g.10gb").slices[0]
        w = mesh.run_workload(s.id, TRAIN, env={"PYTHONPATH": str(ROOT)})
        wait_for(lambda: last_step(mesh, w.id) >= 10, 90, "training to reach step 10")
        step0 = last_step(mesh, w.id)
        t0 = time.monotonic()
        nvml_of(one_node, "hl-solo").sim_inject_xid(s.gpu_index, 95)     # uncontained ECC: the reset class

        def on_the_other_gpu():
            x = mesh.get_workload(w.id)
            target = mesh.get_slice(x.slice_id) if x.slice_id != s.id else None
            return (target is not None and target.gpu_index != s.gpu_index and x.state == t.WORKLOAD_STATE_RUNNING
                    and last_step(mesh, w.id) > step0)
        wait_for(on_the_other_gpu, 240, "the workload to run on the node's healthy GPU")
        print(f"\nXID 95 on a one-node cluster -> workload {w.id} running on GPU "
              f"{mesh.get_slice(mesh.get_workload(w.id).slice_id).gpu_index} after {time.monotonic() - t0:.1f} s")
        wait_for(lambda: "GpuRecovered" in reasons(mesh, "hl-solo"), 120, "the GPU to be reset and return")
        stop_running(mesh)
        release_all(mesh)
