"""The MPS daemon interface (stand-in and real) and the agent's workload runner."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent.gpu import NvmlGpus
from nodeagent.hostfile import make_host
from nodeagent.mps import MpsError, RealMps, SimMps
from nodeagent.nvml import load_nvml
from nodeagent.slicer import Slicer, mps_dirs
from nodeagent.workloads import WorkloadRunner

GiB = 1 << 30


def test_sim_mps_lifecycle_and_clients(tmp_path):
    mps = SimMps()
    pipe, logd = str(tmp_path / "0" / "pipe"), str(tmp_path / "0" / "log")
    assert not mps.healthy(0, pipe)
    with pytest.raises(MpsError):
        mps.add_client(pipe, os.getpid())                  # no daemon: a client cannot connect
    mps.start(0, pipe, logd, "GPU-x")
    mps.start(0, pipe, logd, "GPU-x")                      # idempotent
    assert mps.healthy(0, pipe) and os.path.exists(os.path.join(pipe, "control"))
    assert not mps.healthy(1, pipe)                        # another GPU's daemon is not this one
    mps.add_client(pipe, os.getpid())
    assert mps.clients(pipe) == [os.getpid()]
    with pytest.raises(MpsError, match=str(os.getpid())):
        mps.stop(0, pipe)                                  # clients attached
    mps.remove_client(pipe, os.getpid())
    mps.stop(0, pipe)
    assert not mps.healthy(0, pipe)
    mps.stop(0, pipe)                                      # stopping a stopped daemon is fine
    log = open(os.path.join(logd, "control.log")).read()
    assert "Starting control daemon" in log and "Exiting control daemon" in log


def test_sim_mps_forgets_dead_clients(tmp_path):
    mps = SimMps()
    pipe = str(tmp_path / "pipe")
    mps.start(0, pipe, str(tmp_path / "log"))
    mps.add_client(pipe, 2 ** 22 + 12345)                  # no such pid
    assert mps.clients(pipe) == []
    mps.stop(0, pipe)


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None,
                    reason="nvidia-cuda-mps-control is not installed on this host (needs the NVIDIA driver utilities)")
def test_real_mps_daemon(tmp_path):
    mps = RealMps()
    pipe, logd = str(tmp_path / "pipe"), str(tmp_path / "log")
    mps.start(0, pipe, logd)
    try:
        assert mps.healthy(0, pipe)
    finally:
        mps.stop(0, pipe)
    deadline = time.monotonic() + 60
    while mps.healthy(0, pipe) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not mps.healthy(0, pipe)


def test_real_mps_without_the_binary_is_a_clear_error(tmp_path):
    mps = RealMps(binary="nvidia-cuda-mps-control-missing")
    with pytest.raises(MpsError, match="not found on PATH"):
        mps.start(0, str(tmp_path / "p"), str(tmp_path / "l"))
    assert not mps.healthy(0, str(tmp_path / "p"))


def test_slicer_runs_the_mps_daemon_and_accounts_memory(state_dir, tmp_path):
    nvml = load_nvml("sim", make_host("n1", 1, "L4"), state_dir / "state.json")
    gpus = NvmlGpus(nvml)
    gpus.init()
    inv = gpus.inventory()
    slicer = Slicer(gpus, str(tmp_path / "mps"))
    slicer.mps = SimMps()
    pipe, _ = mps_dirs(slicer.mps_root, 0)

    def sl(sid, mem, iso=t.ISOLATION_MPS):
        return t.Slice(id=sid, gpu_index=0, gpu_uuid=inv[0].uuid, isolation=iso, memory_bytes=mem, compute_share=0.5)

    assert slicer.realize(sl("a", 10 * GiB)).state == t.SLICE_STATE_READY
    assert slicer.mps.healthy(0, pipe)
    assert slicer.realize(sl("b", 10 * GiB)).state == t.SLICE_STATE_READY
    over = slicer.realize(sl("c", 4 * GiB))
    assert over.state == t.SLICE_STATE_FAILED and "do not fit" in over.message
    assert slicer.teardown("a") is None and slicer.mps.healthy(0, pipe)     # b still uses it
    assert slicer.teardown("b") is None and not slicer.mps.healthy(0, pipe)
    assert slicer.realize(sl("x", 20 * GiB, t.ISOLATION_EXCLUSIVE)).state == t.SLICE_STATE_READY
    assert slicer.realize(sl("y", 1 * GiB, t.ISOLATION_TIMESHARE)).state == t.SLICE_STATE_FAILED


# -- the workload runner ------------------------------------------------------------------

class FakeAgent:
    def __init__(self, gpus, node="n1"):
        self.node = node
        self.gpus = gpus
        self.realized = {}
        self.handlers = {}
        self.session_hooks = []


async def until(pred, timeout=60.0):           # a liveness bound (processes start, stop), never a speed
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def drain(q):
    return [q.get_nowait() for _ in range(q.qsize())]


async def test_runner_starts_follows_stops_and_readopts(state_dir, tmp_path):
    nvml = load_nvml("sim", make_host("n1", 1, "H100-80GB"), state_dir / "state.json")
    gpus = NvmlGpus(nvml)
    gpus.init()
    gpus.inventory()
    inst = gpus.create_mig(0, "1g.10gb", 0)
    agent = FakeAgent(gpus)
    agent.realized["s-1"] = node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY,
                                                         device_uuid=inst.uuid, env={"CUDA_VISIBLE_DEVICES": inst.uuid})
    runner = WorkloadRunner(agent, str(tmp_path / "wl"), stop_grace=0.5, poll_interval=0.05).install()
    assert set(agent.handlers) == {"workloads", "logs"}
    outbox: asyncio.Queue = asyncio.Queue()
    runner.on_session(outbox)
    assert drain(outbox)[0].workloads.full
    cmd = node_service_pb2.WorkloadCommand(start=[
        t.Workload(id="w-1", slice_id="s-1", command=[sys.executable, "-c",
                   "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['Y']); time.sleep(30)"],
                   env={"Y": "yes", "CUDA_VISIBLE_DEVICES": "overridden?"}, state=t.WORKLOAD_STATE_PENDING),
        t.Workload(id="w-2", slice_id="s-9", command=["true"], state=t.WORKLOAD_STATE_PENDING)])
    await agent.handlers["workloads"](cmd, outbox)
    reps = {w.id: w for m in drain(outbox) for w in m.workloads.workloads}
    assert reps["w-1"].state == t.WORKLOAD_STATE_RUNNING and reps["w-1"].pid > 0
    assert reps["w-2"].state == t.WORKLOAD_STATE_FAILED and "not ready" in reps["w-2"].message
    pid = reps["w-1"].pid
    assert gpus.device_pids(inst.uuid) == [pid]                 # NVML sees the process on the MIG device
    await until(lambda: os.path.getsize(runner.path("w-1", "log")) > 0)

    await agent.handlers["logs"](node_service_pb2.LogRequest(request_id="r1", workload_id="w-1"), outbox)
    await until(lambda: outbox.qsize() >= 2)
    chunks = [m.log for m in drain(outbox)]
    assert chunks[-1].eof and f"{inst.uuid} yes" in b"".join(c.data for c in chunks).decode()

    # a new runner over the same directory (an agent restart) adopts the running workload
    runner.monitor.cancel()
    agent2 = FakeAgent(gpus)
    agent2.realized = agent.realized
    runner2 = WorkloadRunner(agent2, str(tmp_path / "wl"), stop_grace=0.5, poll_interval=0.05).install()
    out2: asyncio.Queue = asyncio.Queue()
    runner2.on_session(out2)
    full = drain(out2)[0].workloads
    assert full.full and {w.id: w.state for w in full.workloads} == {
        "w-1": t.WORKLOAD_STATE_RUNNING, "w-2": t.WORKLOAD_STATE_FAILED}
    # follow the log while the workload is stopped through the adopted supervisor
    await agent2.handlers["logs"](node_service_pb2.LogRequest(request_id="r2", workload_id="w-1", follow=True,
                                                              tail_lines=1), out2)
    await agent2.handlers["workloads"](node_service_pb2.WorkloadCommand(stop=["w-1"]), out2)
    await until(lambda: runner2.workloads["w-1"].state == t.WORKLOAD_STATE_STOPPED)
    await until(lambda: any(m.WhichOneof("kind") == "log" and m.log.eof for m in list(out2._queue)))
    w1 = runner2.workloads["w-1"]
    assert w1.exit_code == 128 + 15 and "SIGTERM" in w1.message and w1.HasField("finished_at")
    assert gpus.device_pids(inst.uuid) == []                    # gone from NVML at exit
    runner2.monitor.cancel()

    # a full command that no longer lists a running workload stops it; unknown started ones are lost
    await agent2.handlers["workloads"](node_service_pb2.WorkloadCommand(full=True, start=[
        t.Workload(id="w-3", slice_id="s-1", command=["sleep", "30"])]), out2)
    lost = t.Workload(id="w-4", slice_id="s-1", command=["true"], state=t.WORKLOAD_STATE_RUNNING, pid=5)
    await agent2.handlers["workloads"](node_service_pb2.WorkloadCommand(full=True, start=[lost]), out2)
    assert runner2.meta["w-3"]["stop_at"]
    runner2.check_all()
    await until(lambda: (runner2.check_all() or True) and runner2.workloads["w-3"].state == t.WORKLOAD_STATE_STOPPED)
    reps = [w for m in drain(out2) if m.WhichOneof("kind") == "workloads" for w in m.workloads.workloads]
    assert any(w.id == "w-4" and w.state == t.WORKLOAD_STATE_FAILED and "no record" in w.message for w in reps)


async def test_stubborn_workload_is_killed_after_the_grace(state_dir, tmp_path):
    nvml = load_nvml("sim", make_host("n1", 1, "L4"), state_dir / "state.json")
    gpus = NvmlGpus(nvml)
    gpus.init()
    inv = gpus.inventory()
    agent = FakeAgent(gpus)
    agent.realized["s-1"] = node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY,
                                                         device_uuid=inv[0].uuid)
    runner = WorkloadRunner(agent, str(tmp_path / "wl"), stop_grace=0.3, poll_interval=0.05).install()
    outbox: asyncio.Queue = asyncio.Queue()
    runner.on_session(outbox)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(30)"
    await agent.handlers["workloads"](node_service_pb2.WorkloadCommand(start=[
        t.Workload(id="w-1", slice_id="s-1", command=[sys.executable, "-c", code])]), outbox)
    await until(lambda: b"up" in open(runner.path("w-1", "log"), "rb").read())
    runner.stop("w-1")
    await until(lambda: runner.workloads["w-1"].state == t.WORKLOAD_STATE_STOPPED)
    assert runner.workloads["w-1"].exit_code == 128 + 9
    runner.monitor.cancel()
