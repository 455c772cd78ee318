"""A confined workload whose start fails after its isolation plan was made (the plan makes the workload's
cgroup) leaves nothing behind: the cgroup is removed, and when its supervisor had started (an isolated
workload whose network could not be plugged) that supervisor is gone and the process is no longer
registered with the (simulated) NVML. The record is FAILED, so the monitor never finishes it: whatever the
start made must go there. And a workload that expires leaves no link to its control socket under /tmp."""

from __future__ import annotations

import os
import time
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.isolation import cgroups as wl_cg
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers
from tests.unit._shims import kill_shims
from tests.unit._fake_cgroups import StepRemoval

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a confined workload switches to a tenant's uid: root")


class FakeCgroups(StepRemoval):
    version, confines_devices = 1, True

    def __init__(self):
        self.groups: set[str] = set()

    def create(self, name, limits):
        self.groups.add(name)
        return []

    def remove(self, name):
        self.groups.discard(name)

    def exists(self, name):
        return name in self.groups


class FakeNvml:
    def __init__(self):
        self.processes: set[tuple[str, int]] = set()

    def sim_add_process(self, uuid, pid, memory):
        self.processes.add((uuid, pid))

    def sim_remove_process(self, uuid, pid):
        self.processes.discard((uuid, pid))


@pytest.fixture
def setup(tmp_path):
    agent = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                                  claim_hooks=[], gpus=types.SimpleNamespace(nvml=FakeNvml()), slicer=object())
    agent.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY,
                                                          device_uuid="GPU-x")}
    groups = FakeCgroups()
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   groups, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(agent, str(tmp_path / "w"), isolator=iso)
    yield r, groups, agent.gpus.nvml
    kill_shims(r)


def _spec():
    return t.Workload(id="w-1", slice_id="s-1", tenant="ta", command=["sleep", "60"])


@root_only
def test_a_supervisor_that_cannot_start_leaves_no_cgroup(setup, monkeypatch):
    r, groups, _ = setup

    def no_popen(*a, **k):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(wl.subprocess, "Popen", no_popen)
    w = r.start(_spec())
    assert w.state == t.WORKLOAD_STATE_FAILED and "cannot start the supervisor" in w.message
    assert groups.groups == set()


@root_only
def test_an_isolated_workload_whose_network_fails_leaves_no_cgroup_process_or_registration(setup, monkeypatch):
    r, groups, nvml = setup
    real_plan = wl.confinement_plan

    def isolated_plan(runner, w, st):
        plan = real_plan(runner, w, st)       # confine.json is written as planned (host network: no wait)
        plan.spec["network"] = "isolated"     # the runner then plugs its network, which fails
        return plan
    monkeypatch.setattr(wl, "confinement_plan", isolated_plan)

    def no_network(bridge, pid):
        raise RuntimeError("the bridge is gone")
    monkeypatch.setattr(wl, "plug_network", no_network)
    r.isolator.bridge = object()
    w = r.start(_spec())
    assert w.state == t.WORKLOAD_STATE_FAILED and "network" in w.message
    assert groups.groups == set()
    assert nvml.processes == set()
    assert "w-1" not in r.popens and not _alive(r.meta["w-1"]["shim_pid"])     # killed and reaped
    deadline = time.monotonic() + 60          # the workload (the init's exec) dies with its group
    while _alive(w.pid):
        assert time.monotonic() < deadline, "the workload's process outlived its failed start"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """`pid` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


@root_only
def test_an_expired_workload_leaves_no_socket_link_in_tmp(tmp_path, setup):
    """A runner directory too deep for a Unix socket name: the plan links a short name under /tmp to the
    workload's control socket; the link goes with the workload's files when it expires."""
    r0, groups, _ = setup
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True, namespaces=["mount"]),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   groups, NvidiaDevices(str(tmp_path), str(tmp_path / "mig-minors")), node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(r0.agent, str(tmp_path / ("d" * 60) / ("e" * 60)), isolator=iso)
    w = r.start(t.Workload(id="w-1", slice_id="s-1", tenant="ta", command=["true"]))
    link = r.meta["w-1"]["socket"]
    assert w.state == t.WORKLOAD_STATE_RUNNING and link.startswith("/tmp/gpumesh-") and os.path.islink(link)
    deadline = time.monotonic() + 60
    while r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING:
        assert time.monotonic() < deadline, "the workload did not end"
        r.check_all(report=False)
        time.sleep(0.02)
    r.expire("w-1")
    assert not os.path.lexists(link)


@root_only
def test_an_mps_server_that_refuses_the_tenants_limits_leaves_no_cgroup(setup):
    """On an MPS slice the tenant's server gets its limits after the plan made the cgroup: a refusal fails
    the start (naming it) and removes the cgroup."""
    r, groups, _ = setup

    class RefusingMps:
        def set_limits(self, pipe, uid, memory, threads):
            raise RuntimeError("start_server -uid: the daemon refused")
    r.mps = RefusingMps()
    r.agent.desired["s-1"] = t.Slice(id="s-1", gpu_index=-1, memory_bytes=1 << 30, compute_share=0.5)
    r.agent.realized["s-1"].env["CUDA_MPS_PIPE_DIRECTORY"] = str(r.dir)
    w = r.start(_spec())
    assert w.state == t.WORKLOAD_STATE_FAILED and "the daemon refused" in w.message
    assert groups.groups == set()


@root_only
def test_a_cgroup_made_half_is_removed(setup):
    """A cgroup whose limits cannot be written (one controller's directory made, the next write refused):
    permissive mode starts the workload without one, and leaves none of it behind."""
    r, groups, _ = setup

    def half(name, limits):
        groups.groups.add(name)
        raise wl_cg.CgroupError("cannot write '1' to memory.limit_in_bytes: Device or resource busy")
    groups.create = half
    w = r.start(_spec())
    assert w.state == t.WORKLOAD_STATE_RUNNING and r.meta["w-1"]["cgroup"] == ""
    assert groups.groups == set()


@root_only
def test_a_plan_that_fails_after_the_cgroup_leaves_none(setup, tmp_path):
    """The workload's own directory is the tenant's: what it left there (a dangling `nvidia-mps` link from an
    earlier run of the ID) fails the plan of an MPS workload in a mount namespace; the cgroup goes with it."""
    r, groups, _ = setup
    r.isolator.namespaces = ["mount"]
    r.agent.realized["s-1"].env["CUDA_MPS_PIPE_DIRECTORY"] = str(tmp_path / "pipe")
    workdir = r.path("w-1", "d")
    os.makedirs(workdir)
    os.symlink("/nonexistent/gpumesh-test", os.path.join(workdir, "nvidia-mps"))
    w = r.start(_spec())
    assert w.state == t.WORKLOAD_STATE_FAILED and "nvidia-mps" in w.message
    assert groups.groups == set()
