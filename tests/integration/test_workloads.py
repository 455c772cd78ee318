"""Workloads end to end: real processes started by agent processes on slices of
simulated GPUs, through the control plane and the SDK."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors
from nodeagent.nvml.sim import SimNvml
from tests.integration.conftest import wait_for, workload_cluster

pytestmark = pytest.mark.integration
GiB = 1 << 30
PY = sys.executable
HOSTS = [{"node": "wl-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True},
                                   {"model": "L4", "count": 1, "mig": False}]}]
PRINT_ENV = "import os; print('DEV=' + os.environ['CUDA_VISIBLE_DEVICES']); print('MPS=' + os.environ.get(" \
            "'CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', '-') + ',' + os.environ.get('CUDA_MPS_PINNED_DEVICE_MEM_LIMIT', '-'))" \
            "; print('X=' + os.environ.get('X', '-'))"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with workload_cluster(tmp_path_factory.mktemp("wl"), HOSTS, agent_args=["--workload-stop-grace-seconds", "2"]) as c:
        yield c


@pytest.fixture
def mesh(cluster):
    cluster.wait_ready(timeout=30)
    with cluster.client(timeout=30) as client:
        yield client
        for s in client.list_slices():
            try:
                client.release(s.id)
            except errors.MeshError:
                pass


def sim_nvml(cluster, node="wl-a") -> SimNvml:
    return SimNvml(cluster.state_dir / "hosts" / f"{node}.yaml",
                   cluster.state_dir / "agents" / node / "sim" / f"{node}.state.json")


def finished(mesh, wid, timeout=60):
    return wait_for(lambda: (w := mesh.get_workload(wid)).state in (
        t.WORKLOAD_STATE_SUCCEEDED, t.WORKLOAD_STATE_FAILED, t.WORKLOAD_STATE_STOPPED) and w, timeout, f"{wid} to end")


def logs(mesh, wid, **kw) -> str:
    return b"".join(mesh.workload_logs(wid, **kw)).decode()


def test_run_on_mig_and_mps_slices_env_logs_exit_codes(cluster, mesh):
    mig = mesh.allocate(tenant="wl", mig_profile="1g.10gb", gpu_model="H100-80GB").slices[0]
    w = mesh.run_workload(mig.id, [PY, "-c", PRINT_ENV], env={"X": "42"}, labels={"job": "env"})
    assert w.node == "wl-a" and w.tenant == "wl" and w.state in (t.WORKLOAD_STATE_RUNNING, t.WORKLOAD_STATE_SUCCEEDED)
    done = finished(mesh, w.id)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED and done.exit_code == 0 and done.pid > 0
    text = logs(mesh, w.id)
    assert f"DEV={mig.device_uuid}" in text and "X=42" in text and "MPS=-,-" in text
    assert logs(mesh, w.id, tail_lines=1).strip() == "X=42"

    mps = mesh.allocate(tenant="wl", memory_bytes=4 * GiB, isolation="mps", compute_share=0.5).slices[0]
    assert mps.gpu_model == "L4"
    pipe = mps.env["CUDA_MPS_PIPE_DIRECTORY"]
    assert os.path.exists(os.path.join(pipe, "control"))           # the (stand-in) MPS daemon runs
    w2 = mesh.run_workload(mps.id, [PY, "-c", PRINT_ENV])
    assert finished(mesh, w2.id).state == t.WORKLOAD_STATE_SUCCEEDED
    assert f"DEV={mps.device_uuid}" in logs(mesh, w2.id) and "MPS=50,0=4096M" in logs(mesh, w2.id)

    bad = mesh.run_workload(mig.id, [PY, "-c", "import sys; print('bye'); sys.exit(3)"])
    bad = finished(mesh, bad.id)
    assert bad.state == t.WORKLOAD_STATE_FAILED and bad.exit_code == 3 and "status 3" in bad.message
    missing = finished(mesh, mesh.run_workload(mig.id, ["/no/such/program"]).id)
    assert missing.state == t.WORKLOAD_STATE_FAILED and missing.exit_code == 127
    assert {x.id for x in mesh.list_workloads(slice_id=mig.id)} == {w.id, bad.id, missing.id}

    mesh.release(mps.id)
    assert not os.path.exists(os.path.join(pipe, "control"))       # last MPS slice gone: daemon stopped


def test_validation_and_preconditions(mesh):
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.run_workload("", ["true"])
    assert exc.value.field == "slice_id"
    with pytest.raises(errors.NotFound):
        mesh.run_workload("s-000000000000", ["true"])
    s = mesh.allocate(tenant="wl", mig_profile="1g.10gb").slices[0]
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.run_workload(s.id, [])
    assert exc.value.field == "command"
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.run_workload(s.id, ["true"], env={"CUDA_VISIBLE_DEVICES": "0"})
    assert exc.value.field == "env[CUDA_VISIBLE_DEVICES]"
    with pytest.raises(errors.InvalidArgument) as exc:
        mesh.run_workload(s.id, ["true"], env={"1BAD": "x"})
    assert exc.value.field == "env[1BAD]"
    # a slice the agent has not realized yet refuses workloads; the agent may realize it between
    # the Allocate and the Run, so either the refusal names the state or the slice is READY by then
    pending = mesh.allocate(tenant="wl", mig_profile="1g.10gb", no_wait=True).slices[0]
    try:
        mesh.run_workload(pending.id, ["true"])
    except errors.FailedPrecondition as e:
        assert "PENDING" in str(e)
    else:
        assert mesh.get_slice(pending.id).state == t.SLICE_STATE_READY
    with pytest.raises(errors.NotFound):
        mesh.get_workload("w-000000000000")
    with pytest.raises(errors.NotFound):
        list(mesh.workload_logs("w-000000000000"))


def test_stop_and_release_stop_running_workloads(mesh):
    s = mesh.allocate(tenant="wl", mig_profile="2g.20gb").slices[0]
    sleeper = mesh.run_workload(s.id, ["sleep", "30"])
    assert sleeper.state == t.WORKLOAD_STATE_RUNNING and sleeper.pid > 0
    stopped = mesh.stop_workload(sleeper.id)
    assert stopped.state == t.WORKLOAD_STATE_STOPPED
    assert "SIGTERM" in stopped.message     # ended by the signal, not killed after the grace
    # a process that ignores SIGTERM is killed after the grace period (2 s in this cluster)
    stubborn = mesh.run_workload(s.id, [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                        "signal.SIG_IGN); print('up', flush=True); time.sleep(30)"])
    wait_for(lambda: "up" in logs(mesh, stubborn.id), 30, "the stubborn workload to start")
    assert mesh.stop_workload(stubborn.id).state == t.WORKLOAD_STATE_STOPPED
    # releasing a slice stops what runs on it first, so the release is not blocked
    again = mesh.run_workload(s.id, ["sleep", "30"])
    mesh.release(s.id)
    with pytest.raises(errors.NotFound):
        mesh.get_slice(s.id)
    assert mesh.get_workload(again.id).state == t.WORKLOAD_STATE_STOPPED


def test_in_use_blocks_release_until_the_process_exits(cluster, mesh):
    s = mesh.allocate(tenant="wl", mig_profile="1g.10gb", gpu_model="H100-80GB").slices[0]
    nvml = sim_nvml(cluster)
    nvml.sim_add_process(s.device_uuid, 999_999, 1 << 30)      # a CUDA process the mesh did not start
    released = []
    th = threading.Thread(target=lambda: released.append(mesh.release(s.id)))
    th.start()
    agent_log = cluster.state_dir / "logs" / "wl-a.log"
    try:
        # the agent's teardown refused (IN_USE): waited for in its log, not assumed after a fixed time
        wait_for(lambda: "in use by process(es) 999999" in agent_log.read_text(), 60,
                 "the agent to refuse the teardown")
        assert mesh.get_slice(s.id).state == t.SLICE_STATE_RELEASING        # refused: IN_USE
        gi_ids = [gi["id"] for gi in nvml.sim_state()["gpus"][0]["gis"]]
        assert gi_ids == [s.gpu_instance_id]                                  # the instance is still there
    finally:
        nvml.sim_remove_process(s.device_uuid, 999_999)
    th.join(180)
    assert released and not th.is_alive()
    wait_for(lambda: not [x for x in mesh.list_slices() if x.id == s.id], 30, "the slice to go")


def test_agent_restart_keeps_workloads(cluster, mesh):
    s = mesh.allocate(tenant="wl", mig_profile="1g.10gb").slices[0]
    long = mesh.run_workload(s.id, ["sleep", "30"])
    short = mesh.run_workload(s.id, [PY, "-c", "import time; time.sleep(1.5); print('done')"])
    assert short.pid > 0
    cluster.kill_agent("wl-a")
    wait_for(lambda: ended(short.pid), 60, "`short` to end while no agent is there")
    cluster.start_agent("wl-a")
    cluster.wait_ready(nodes=["wl-a"], timeout=30)
    done = finished(mesh, short.id)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED and "done" in logs(mesh, short.id)
    still = wait_for(lambda: (w := mesh.get_workload(long.id)).state == t.WORKLOAD_STATE_RUNNING and w, 30,
                     "the long workload to be RUNNING")
    assert still.pid == long.pid and os.path.exists(f"/proc/{long.pid}")
    assert mesh.stop_workload(long.id).state == t.WORKLOAD_STATE_STOPPED
    wait_for(lambda: ended(long.pid), 30, "the process to exit")


def ended(pid: int) -> bool:
    """The process has exited (gone, or a zombie its parent has not reaped yet)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def shims_of(wid: str) -> list[int]:
    """The live supervisors (nodeagent/shim.py) of workload `wid`, found by their pid-file argument."""
    out = []
    for name in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{name}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{name}/stat", "rb").read().rsplit(b")", 1)[-1].split()[0]
        except (OSError, ValueError):
            continue
        if state != b"Z" and any(a.endswith(b"shim.py") for a in cmd) and \
                any(a.endswith(f"/{wid}.pid".encode()) for a in cmd):
            out.append(int(name))
    return out


def test_agent_killed_right_after_starting_a_workload_never_runs_it_twice(cluster, mesh):
    """The agent is SIGKILLed right after it launched the workload's supervisor, before it recorded or
    reported the start (test hook MESH_AGENT_TEST_CRASH_AT=after-launch, nodeagent/workloads.py): the
    restarted agent re-adopts that supervisor; the control plane's full command (the workload still
    PENDING there) does not start a second copy."""
    s = mesh.allocate(tenant="wl", mig_profile="1g.10gb").slices[0]
    cluster.stop_agent("wl-a")
    name = cluster.agent_for("wl-a")
    proc = cluster._agent_proc(name)
    saved, cluster.env = cluster.env, {**(cluster.env or os.environ), "MESH_AGENT_TEST_CRASH_AT": "after-launch"}
    try:
        cluster.agents[name] = proc
        cluster._spawn(proc)
    finally:
        cluster.env = saved
    try:
        cluster.wait_ready(nodes=["wl-a"], timeout=30)
        wait_for(lambda: mesh.get_slice(s.id).state == t.SLICE_STATE_READY, 30, "the slice to be READY again")
        w = mesh.run_workload(s.id, ["sleep", "60"])
        wait_for(lambda: not proc.running(), 30, "the agent to crash at the hook")
        first = wait_for(lambda: shims_of(w.id), 30, "the supervisor the crashed agent launched")
        assert mesh.get_workload(w.id).state != t.WORKLOAD_STATE_RUNNING      # no report came
    finally:
        cluster.start_agent("wl-a")          # without the hook
    cluster.wait_ready(nodes=["wl-a"], timeout=30)
    running = wait_for(lambda: (x := mesh.get_workload(w.id)).state == t.WORKLOAD_STATE_RUNNING and x, 30,
                       "the re-adopted workload to be RUNNING")
    time.sleep(1.0)                          # room for a (wrong) second start to show
    assert shims_of(w.id) == first and len(first) == 1
    assert running.pid and os.path.exists(f"/proc/{running.pid}")
    assert mesh.stop_workload(w.id).state == t.WORKLOAD_STATE_STOPPED
    wait_for(lambda: not shims_of(w.id), 30, "the supervisor to end")


def test_run_request_id_is_idempotent_across_a_control_plane_restart(cluster, mesh):
    """A retried Run with the same request_id returns the first workload, also after the control plane
    was killed and restarted (the id is in etcd); another id runs a second one."""
    s = mesh.allocate(tenant="wl", mig_profile="1g.10gb").slices[0]
    cmd = [PY, "-c", "import time; time.sleep(30)"]
    first = mesh.run_workload(s.id, cmd, request_id="retry-me-1")
    assert first.state == t.WORKLOAD_STATE_RUNNING
    assert mesh.run_workload(s.id, cmd, request_id="retry-me-1").id == first.id
    cluster.restart_controlplane(kill=True)
    with cluster.client(timeout=30) as again:
        retried = again.run_workload(s.id, cmd, request_id="retry-me-1")
        assert retried.id == first.id
        assert [w.id for w in again.list_workloads(slice_id=s.id) if w.state == t.WORKLOAD_STATE_RUNNING] == [first.id]
        other = again.run_workload(s.id, cmd, request_id="retry-me-2")
        assert other.id != first.id
        with pytest.raises(errors.InvalidArgument, match="request_id"):
            again.run_workload(s.id, cmd, request_id="x" * 200)
        for wid in (first.id, other.id):
            again.stop_workload(wid)
