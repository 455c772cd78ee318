"""A hand-started vLLM's GPU memory share follows its slice: the agent restarts it in place with the share its
control plane's record names when that differs from the one it runs with (nodeagent/workload_renewal.py).

vLLM preallocates its --gpu-memory-utilization of the whole GPU at start. The control plane writes the share derived
from the slice's new size into the workload's record after an in-place resize (controlplane/controllers/
backendshare.py) and sends the record in a WorkloadCommand; before, the agent ignored a start for a workload it
runs, so the server kept holding the old share (more than a shrunk slice). Now the agent restarts it through the
same restart-in-place step as a certificate renewal (same slice and confinement), reports it and says so in an
event; a deployment's replica (the control plane replaces those) and a llama.cpp server (no share) are left alone.

The server is a stand-in that sleeps; its argv carries the share as vLLM's would. No timed assertions: the restart
is awaited through the renewal's task."""

from __future__ import annotations

import asyncio
import sys

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.backends import llamacpp, vllm
from tests.unit._shims import kill_shims
from tests.unit.test_backend_cert_renewal import Died, drained, make_agent

SLEEPER = "import time\nwhile True: time.sleep(60)"


def stand_in_vllm(b, host, port, python, vhost):
    return ([sys.executable, "-c", SLEEPER, "--gpu-memory-utilization", f"{b.gpu_memory_utilization:.4f}"],
            {}, "cuda")


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm, "prepare", stand_in_vllm)
    monkeypatch.setattr(llamacpp, "command", lambda b, host, port, python: [sys.executable, "-c", SLEEPER])
    r = wl.WorkloadRunner(make_agent(), str(tmp_path / "w"), stop_grace=5)
    r.outbox = asyncio.Queue()
    yield r
    kill_shims(r)


def spec(wid="w-1", kind="vllm", share=0.5, **labels) -> t.Workload:
    return t.Workload(id=wid, slice_id="s-1", tenant="team-a", labels=labels, backend=t.ServingBackend(
        kind=kind, artifact="/models/tiny", api_key="k" * 32, gpu_memory_utilization=share if kind == "vllm" else 0))


def resized(w: t.Workload, share: float) -> t.Workload:
    """The control plane's record after a resize: the same workload with the new share."""
    n = t.Workload()
    n.CopyFrom(w)
    n.backend.gpu_memory_utilization = share
    return n


def share_in(w: t.Workload) -> str:
    argv = list(w.command)
    return argv[argv.index("--gpu-memory-utilization") + 1]


async def command_and_restarts(r, w: t.Workload) -> None:
    await r.on_command(node_service_pb2.WorkloadCommand(start=[w]), r.outbox)
    await asyncio.gather(*r.renewal.tasks.values())


async def test_a_new_share_in_the_record_restarts_the_vllm_server_with_it(runner):
    old = await asyncio.to_thread(runner.start, spec())
    assert old.state == t.WORKLOAD_STATE_RUNNING, old.message
    old = resized(old, 0.5)
    assert "0.5000" in old.command
    drained(runner.outbox)
    await command_and_restarts(runner, resized(old, 0.25))
    new = runner.workloads["w-1"]
    assert new.state == t.WORKLOAD_STATE_RUNNING, new.message
    assert new.pid and new.pid != old.pid                           # a new server ...
    assert share_in(new) == "0.2500"      # ... with the new share
    assert new.backend.gpu_memory_utilization == 0.25               # a later restart keeps it
    again = wl.WorkloadRunner(make_agent(), runner.dir)              # what a restarted agent reads
    assert again.workloads["w-1"].backend.gpu_memory_utilization == 0.25
    msgs = drained(runner.outbox)
    reports = [w for m in msgs if m.HasField("workloads") for w in m.workloads.workloads]
    assert [(w.id, w.state, w.pid) for w in reports][-1] == ("w-1", t.WORKLOAD_STATE_RUNNING, new.pid)
    events = [m.event for m in msgs if m.HasField("event")]
    assert [(e.type, e.reason) for e in events] == [("Normal", "BackendRestartedForResize")]
    assert "0.2500" in events[0].message and "0.5000" in events[0].message
    await command_and_restarts(runner, resized(old, 0.25))          # the same share again: nothing to do
    assert runner.workloads["w-1"].pid == new.pid


async def test_the_same_share_a_replica_and_a_llamacpp_server_are_not_restarted(runner):
    for w in (spec("w-1"), spec("w-2", **{"gpumesh.replica": "r-1"}), spec("w-3", kind="llama.cpp")):
        got = await asyncio.to_thread(runner.start, w)
        assert got.state == t.WORKLOAD_STATE_RUNNING, got.message
    pids = {wid: w.pid for wid, w in runner.workloads.items()}
    records = [resized(runner.workloads["w-1"], 0.5), resized(runner.workloads["w-2"], 0.25),
               resized(runner.workloads["w-3"], 0.0)]
    await command_and_restarts(runner, records[0])
    await command_and_restarts(runner, records[1])
    await command_and_restarts(runner, records[2])
    assert {wid: w.pid for wid, w in runner.workloads.items()} == pids
    assert not any(m.HasField("event") for m in drained(runner.outbox))


async def test_a_share_that_cannot_be_applied_now_is_applied_once_the_slice_is_ready(runner):
    old = resized(await asyncio.to_thread(runner.start, spec()), 0.5)
    runner.agent.realized["s-1"].state = t.SLICE_STATE_PENDING
    await command_and_restarts(runner, resized(old, 0.25))
    assert runner.workloads["w-1"].pid == old.pid                   # not now ...
    runner.agent.realized["s-1"].state = t.SLICE_STATE_READY
    runner.renewal.step()                                           # ... but on the monitor's next pass
    await asyncio.gather(*runner.renewal.tasks.values())
    new = runner.workloads["w-1"]
    assert new.pid != old.pid and share_in(new) == "0.2500"


@pytest.mark.parametrize("where", ["after-stop", "before-launch"])
async def test_an_agent_that_dies_mid_restart_starts_the_server_with_the_new_share_after_its_own(
        runner, monkeypatch, where):
    """Killed after the old server ended: the restarted agent's first pass starts it again, with the new share."""
    old = resized(await asyncio.to_thread(runner.start, spec()), 0.5)

    def die(self, at):
        if at == where:
            raise Died(at)
    monkeypatch.setattr(wl.WorkloadRunner, "_crash_point", die)
    with pytest.raises(Died):
        await command_and_restarts(runner, resized(old, 0.25))
    monkeypatch.undo()
    monkeypatch.setattr(vllm, "prepare", stand_in_vllm)
    again = wl.WorkloadRunner(runner.agent, runner.dir, stop_grace=5)         # the restarted agent
    again.outbox = asyncio.Queue()
    try:
        again.check_all(report=False)                   # the monitor leaves it to the restart: not ended
        assert again.workloads["w-1"].state != t.WORKLOAD_STATE_FAILED
        again.renewal.step()
        await asyncio.gather(*again.renewal.tasks.values())
        n = again.workloads["w-1"]
        assert n.state == t.WORKLOAD_STATE_RUNNING, n.message
        assert n.pid != old.pid and share_in(n) == "0.2500" and n.backend.gpu_memory_utilization == 0.25
        assert "renewing" not in again.meta["w-1"] and "share_wanted" not in again.meta["w-1"]
    finally:
        kill_shims(again)
