"""A stop that arrives after the workload ended on its own (the control plane's stop crossed the exit, or a
full resync stops what it no longer wants) does not rewrite how it ended: a job that succeeded stays
SUCCEEDED with its exit status, one that failed stays FAILED. A stop of a workload that still runs makes it
STOPPED as before."""

from __future__ import annotations

import os
import time
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from tests.unit._shims import kill_shims


@pytest.fixture
def runner(tmp_path):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=30)
    yield r
    kill_shims(r)


def _ended(r, wid):
    deadline = time.monotonic() + 60
    while not os.path.exists(r.path(wid, "exit")):
        assert time.monotonic() < deadline, "the workload did not end"
        time.sleep(0.02)


def _finished(r, wid):
    """The monitor's rounds until it records the end (the shim exits just after writing the exit file)."""
    deadline = time.monotonic() + 60
    while r.workloads[wid].state == t.WORKLOAD_STATE_RUNNING:
        assert time.monotonic() < deadline, "the workload's end was not recorded"
        r.check_all(report=False)
        time.sleep(0.02)


@pytest.mark.parametrize("command,state,code", [(["true"], t.WORKLOAD_STATE_SUCCEEDED, 0),
                                                (["sh", "-c", "exit 3"], t.WORKLOAD_STATE_FAILED, 3)])
def test_a_stop_after_the_exit_keeps_the_workloads_own_outcome(runner, command, state, code):
    runner.start(t.Workload(id="w-1", slice_id="s-1", command=command))
    _ended(runner, "w-1")
    runner.stop("w-1")          # before the monitor saw the exit
    _finished(runner, "w-1")
    w = runner.workloads["w-1"]
    assert (w.state, w.exit_code) == (state, code), w.message


def test_a_stop_of_a_running_workload_makes_it_stopped(runner):
    runner.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))
    runner.stop("w-1")
    _finished(runner, "w-1")
    w = runner.workloads["w-1"]
    assert w.state == t.WORKLOAD_STATE_STOPPED and "killed by SIGTERM" in w.message


def test_an_agent_that_dies_just_after_sending_the_stop_still_records_it_as_stopped(runner, monkeypatch):
    """The stop is in the record before its SIGTERM is sent: a restarted agent then reports the end as the
    stop it was (STOPPED), not as a workload killed by SIGTERM (FAILED)."""
    runner.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))
    real_signal = wl.WorkloadRunner._signal

    def signal_then_die(self, wid, sig):
        real_signal(self, wid, sig)
        raise SystemExit("the agent died here")
    monkeypatch.setattr(wl.WorkloadRunner, "_signal", signal_then_die)
    with pytest.raises(SystemExit):
        runner.stop("w-1")
    monkeypatch.undo()
    again = wl.WorkloadRunner(runner.agent, runner.dir, stop_grace=30)     # the restarted agent
    _finished(again, "w-1")
    w = again.workloads["w-1"]
    assert w.state == t.WORKLOAD_STATE_STOPPED and "killed by SIGTERM" in w.message, w.message


@pytest.mark.parametrize("restart", [False, True])
def test_a_workload_killed_after_the_stop_grace_says_so_across_an_agent_restart(tmp_path, restart):
    """A workload that outlives SIGTERM gets SIGKILL after the stop grace; its end names that kill (not a supervisor
    that ended without recording the exit status, which is how it read), and so does an agent restarted after the
    kill: the `killed` mark is in the record."""
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=0.2)
    try:
        r.start(t.Workload(id="w-1", slice_id="s-1",
                           command=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]))
        deadline = time.monotonic() + 60
        while b"ready" not in open(r.path("w-1", "log"), "rb").read():     # it ignores SIGTERM from now on
            assert time.monotonic() < deadline, "the workload did not start"
            time.sleep(0.02)
        r.stop("w-1")
        while not r.meta["w-1"].get("killed"):
            assert time.monotonic() < deadline, "no SIGKILL after the stop grace"
            r.check_all(report=False)
            time.sleep(0.02)
        if restart:             # the agent dies now; its supervisor, killed, is reaped by init
            r.popens["w-1"].wait(60)
            r = wl.WorkloadRunner(a, r.dir, stop_grace=0.2)
        _finished(r, "w-1")
        w = r.workloads["w-1"]
        assert w.state == t.WORKLOAD_STATE_STOPPED and w.exit_code == 137, w.message
        assert w.message == "stopped on request; killed by SIGKILL: still running when the stop grace after SIGTERM ended"
    finally:
        kill_shims(r)
