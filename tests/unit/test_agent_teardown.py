"""A restarted agent whose slice was released while it was away: the workload still running on the slice's
MIG instance is stopped first, then the instance is destroyed (the simulated NVML, like the real one,
refuses to destroy an instance with processes on it: IN_USE), and a new slice at the same placement is
realized in the same resync. Also a removal of a slice whose workload still runs: stopped, then torn down."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from gpumesh.v1 import node_service_pb2, types_pb2 as t
from nodeagent.agent import NodeAgent
from nodeagent.gpu import GpuInUse, NvmlGpus
from nodeagent.hostfile import make_host
from nodeagent.nvml import load_nvml
from nodeagent.workloads import WorkloadRunner

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def new_agent(state_dir, tmp_path):
    """An agent process's view: a fresh NVML handle on the same device state, a runner on the same directory."""
    return new_agent_gpus(state_dir, tmp_path, 1)


def new_agent_gpus(state_dir, tmp_path, n: int):
    nvml = load_nvml("sim", make_host("n1", n, "H100-80GB"), state_dir / "state.json")
    gpus = NvmlGpus(nvml)
    gpus.init()
    agent = NodeAgent("n1", "127.0.0.1:1", gpus, mps_root=str(tmp_path / "mps"), ib_root=None)
    runner = WorkloadRunner(agent, str(tmp_path / "wl"), stop_grace=2.0, poll_interval=0.05).install()
    return agent, gpus, runner


def mig_slice(gpus, sid, start=0):
    inv = gpus.inventory()[0]
    s = t.Slice(id=sid, node="n1", gpu_index=0, gpu_uuid=inv.uuid, isolation=t.ISOLATION_MIG, profile="1g.10gb",
                memory_bytes=10 << 30)
    s.placement.start = start
    return s


async def start_workload(agent, runner, wid, sid):
    outbox: asyncio.Queue = asyncio.Queue()
    runner.on_session(outbox)
    await agent.handlers["workloads"](node_service_pb2.WorkloadCommand(start=[
        t.Workload(id=wid, slice_id=sid, command=SLEEPER, state=t.WORKLOAD_STATE_PENDING)]), outbox)
    w = runner.workloads[wid]
    assert w.state == t.WORKLOAD_STATE_RUNNING and w.pid > 0, w.message
    return w


async def test_restarted_agent_stops_the_workload_before_destroying_the_orphan(state_dir, tmp_path, caplog):
    agent, gpus, runner = new_agent(state_dir, tmp_path)
    outbox: asyncio.Queue = asyncio.Queue()
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[mig_slice(gpus, "s-old")]), outbox)
    assert agent.realized["s-old"].state == t.SLICE_STATE_READY
    w = await start_workload(agent, runner, "w-1", "s-old")
    inst = agent.slicer.mig["s-old"]
    assert gpus.device_pids(inst.uuid) == [w.pid]
    with pytest.raises(GpuInUse):                         # what the GPU answers while the process runs
        gpus.destroy_mig(0, inst.gi_id)
    runner.monitor.cancel()

    # the agent process dies; meanwhile the control plane releases s-old and places s-new at the same spot
    agent2, gpus2, runner2 = new_agent(state_dir, tmp_path)
    assert runner2.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING      # adopted from its record
    out2: asyncio.Queue = asyncio.Queue()
    runner2.on_session(out2)
    await agent2._apply(node_service_pb2.DesiredSlices(full=True, upserts=[mig_slice(gpus2, "s-new")]), out2)
    w1 = runner2.workloads["w-1"]
    assert w1.state == t.WORKLOAD_STATE_STOPPED and "its slice was released" in w1.message
    assert not agent2.stuck_orphans
    assert gpus2.device_pids(inst.uuid) == []
    # the old slice's instance was not adopted for the new slice (its workload named s-old): it was destroyed
    # (after its workload ended: destroying it first is refused, leaving it stuck and the placement taken),
    # and the new slice holds the placement on a fresh instance
    assert any("removed orphan MIG instance" in r.getMessage() for r in caplog.records)
    assert agent2.realized["s-new"].state == t.SLICE_STATE_READY, agent2.realized["s-new"].message
    found = gpus2.mig_instances(0)
    assert [(i.profile, i.start) for i in found] == [("1g.10gb", 0)] and gpus2.device_pids(found[0].uuid) == []
    reports = [m for m in [out2.get_nowait() for _ in range(out2.qsize())] if m.WhichOneof("kind") == "workloads"]
    assert any(x.id == "w-1" and x.state == t.WORKLOAD_STATE_STOPPED for m in reports for x in m.workloads.workloads)
    runner2.monitor.cancel()


async def test_removal_stops_the_workload_then_tears_down(state_dir, tmp_path):
    agent, gpus, runner = new_agent(state_dir, tmp_path)
    outbox: asyncio.Queue = asyncio.Queue()
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[mig_slice(gpus, "s-1", start=1)]), outbox)
    await start_workload(agent, runner, "w-2", "s-1")
    await agent._apply(node_service_pb2.DesiredSlices(removals=["s-1"]), outbox)
    assert runner.workloads["w-2"].state == t.WORKLOAD_STATE_STOPPED
    assert gpus.mig_instances(0) == [] and not agent.stuck
    released = [sid for m in [outbox.get_nowait() for _ in range(outbox.qsize())]
                if m.WhichOneof("kind") == "report" for sid in m.report.released]
    assert released == ["s-1"]
    runner.monitor.cancel()


def shared_slice(gpus, sid, isolation, gpu_index=0):
    inv = gpus.inventory()[gpu_index]
    return t.Slice(id=sid, node="n1", gpu_index=gpu_index, gpu_uuid=inv.uuid, isolation=isolation,
                   memory_bytes=8 << 30, compute_share=0.25)


@pytest.mark.parametrize("isolation", [t.ISOLATION_TIMESHARE, t.ISOLATION_MPS, t.ISOLATION_EXCLUSIVE],
                         ids=["timeshare", "mps", "exclusive"])
async def test_removal_of_a_whole_gpu_slice_stops_its_workload(state_dir, tmp_path, isolation):
    """An MPS, time-share or exclusive slice's device is the whole GPU (no MIG instance): its removal used to
    be reported released while its workload kept running on the GPU the next slice is given."""
    agent, gpus, runner = new_agent(state_dir, tmp_path)
    outbox: asyncio.Queue = asyncio.Queue()
    others = [] if isolation == t.ISOLATION_EXCLUSIVE else [shared_slice(gpus, "s-2", isolation)]
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[shared_slice(gpus, "s-1", isolation),
                                                                          *others]), outbox)
    assert agent.realized["s-1"].state == t.SLICE_STATE_READY, agent.realized["s-1"].message
    w = await start_workload(agent, runner, "w-1", "s-1")
    pid = w.pid
    if others:                                            # a neighbour on the same GPU: not its slice
        await start_workload(agent, runner, "w-2", "s-2")
    await agent._apply(node_service_pb2.DesiredSlices(removals=["s-1"]), outbox)
    w1 = runner.workloads["w-1"]
    assert w1.state == t.WORKLOAD_STATE_STOPPED and "its slice was released" in w1.message
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    if others:
        assert runner.workloads["w-2"].state == t.WORKLOAD_STATE_RUNNING
    released = [sid for m in [outbox.get_nowait() for _ in range(outbox.qsize())]
                if m.WhichOneof("kind") == "report" for sid in m.report.released]
    assert released == ["s-1"]
    for wid in list(runner.workloads):
        runner.stop(wid)
    runner.monitor.cancel()


async def test_a_resized_shared_slices_target_is_kept_when_the_reserved_slice_is_released(state_dir, tmp_path):
    """A resize by migration of a time-share slice: the target started on the reserved slice (its record names
    it) on GPU 1; after the commit's swap the reserved ID names the old placement (GPU 0) and is released. The
    target runs on under the client's slice ID; only what ran on GPU 0 under the reserved ID stops."""
    agent, gpus, runner = new_agent_gpus(state_dir, tmp_path, 2)
    outbox: asyncio.Queue = asyncio.Queue()
    client = shared_slice(gpus, "s-c", t.ISOLATION_TIMESHARE, 0)
    reserved = shared_slice(gpus, "s-r", t.ISOLATION_TIMESHARE, 1)
    await agent._apply(node_service_pb2.DesiredSlices(full=True, upserts=[client, reserved]), outbox)
    await start_workload(agent, runner, "w-t", "s-r")     # the target, on GPU 1
    swapped_client = shared_slice(gpus, "s-c", t.ISOLATION_TIMESHARE, 1)
    swapped_reserved = shared_slice(gpus, "s-r", t.ISOLATION_TIMESHARE, 0)
    await agent._apply(node_service_pb2.DesiredSlices(upserts=[swapped_client, swapped_reserved]), outbox)
    await agent._apply(node_service_pb2.DesiredSlices(removals=["s-r"]), outbox)
    assert runner.workloads["w-t"].state == t.WORKLOAD_STATE_RUNNING
    runner.stop("w-t")
    runner.monitor.cancel()
