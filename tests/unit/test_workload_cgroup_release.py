"""Removing an ended workload's cgroup never holds the agent's event loop: a killed process may take seconds to
leave its group (a large address space, a GPU context the driver tears down), and the removal waited for it on
the loop (up to 2.5 s a controller, four controllers on cgroup v1), so no heartbeat, report or command was served
meanwhile. Now the monitor makes one attempt per pass and the workload ends once its group is gone.

The cgroup driver is the real one (cgroup v2) over a stand-in root directory: a file left in the group's directory
stands for a process that has not left yet (rmdir fails, as the kernel's EBUSY), and removing it lets it go."""

from __future__ import annotations

import asyncio
import json
import time
import types

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.isolation import cgroups as cg
from nodeagent.isolation.devices import NvidiaDevices
from nodeagent.isolation.plan import Isolator, IsolationSettings
from nodeagent.isolation.probe import HostFeatures
from nodeagent.isolation.users import TenantUsers


def _runner(tmp_path):
    agent = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                                  claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()), slicer=object())
    agent.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY)}
    iso = Isolator(IsolationSettings(mode="permissive", seccomp=False, shm_root=str(tmp_path / "shm")),
                   HostFeatures(setuid=True, no_new_privs=True),
                   TenantUsers((310000, 310010), {}, str(tmp_path / "ids.json")),
                   cg.CgroupV2("gpumesh", str(tmp_path / "cg")), NvidiaDevices(str(tmp_path), str(tmp_path / "mig")),
                   node="n1", scope=str(tmp_path))
    r = wl.WorkloadRunner(agent, str(tmp_path / "w"), isolator=iso, poll_interval=0.02)
    # a workload whose supervisor has ended (its exit status recorded), its cgroup still to remove
    r.workloads["w-1"] = t.Workload(id="w-1", slice_id="s-1", node="n1", state=t.WORKLOAD_STATE_RUNNING, pid=4242)
    r.meta["w-1"] = {"shim_pid": 0, "device_uuid": "", "stop_at": 0.0, "cgroup": "n1/w-1"}
    r.save("w-1")
    with open(r.path("w-1", "exit"), "w", encoding="utf-8") as f:
        json.dump({"exit_code": 0, "signal": 0, "finished_at": time.time()}, f)
    return r, tmp_path / "cg" / "gpumesh" / "n1" / "w-1"


async def test_the_loop_runs_on_while_an_ended_workloads_cgroup_waits_for_its_processes(tmp_path):
    r, group = _runner(tmp_path)
    group.mkdir(parents=True)
    (group / "lingering").write_text("a killed process that has not left yet")
    waiting_ticks = 0

    async def ticker():         # another of the agent's coroutines (a heartbeat, a report)
        nonlocal waiting_ticks
        while True:
            await asyncio.sleep(0.01)
            if (group / "cgroup.kill").exists() and r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING:
                waiting_ticks += 1          # the removal began (its processes were killed) and waits
                if waiting_ticks == 3:
                    for f in group.iterdir():
                        f.unlink()          # ... until they have left
    tick = asyncio.get_running_loop().create_task(ticker())
    outbox: asyncio.Queue = asyncio.Queue()
    try:
        r.on_session(outbox)
        deadline = time.monotonic() + 60
        while r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING:
            assert time.monotonic() < deadline, "the workload never ended"
            await asyncio.sleep(0.02)
    finally:
        tick.cancel()
        if r.monitor is not None:
            r.monitor.cancel()
    assert waiting_ticks >= 3, "the event loop was held while the cgroup's processes were leaving"
    assert not group.exists(), "the cgroup was left behind"
    assert r.workloads["w-1"].state == t.WORKLOAD_STATE_SUCCEEDED
    ends = []
    while not outbox.empty():
        ends += [w for w in outbox.get_nowait().workloads.workloads if w.state != t.WORKLOAD_STATE_RUNNING]
    assert [w.id for w in ends] == ["w-1"]          # reported once, when its processes were gone
    assert wl.WorkloadRunner(r.agent, r.dir).workloads["w-1"].state == t.WORKLOAD_STATE_SUCCEEDED   # and recorded
