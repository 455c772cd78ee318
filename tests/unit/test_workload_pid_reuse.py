"""A workload supervisor's pid, remembered in the record, may be reused once that supervisor is gone (after an
agent restart the runner has no Popen and recognises its shim in /proc). The pid must then be recognised as
another workload's shim, never taken for this one's: else the record stays RUNNING while the other workload
runs, and a stop signals the other workload's process group."""

from __future__ import annotations

import os
import signal
import time
import types

import pytest

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from tests.unit._shims import kill_shims


def fake_agent():
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    return a


@pytest.fixture
def runner_dir(tmp_path):
    d = str(tmp_path / "w")
    yield d
    r = wl.WorkloadRunner(fake_agent(), d)
    kill_shims(r)


def wait_for(cond, what):
    deadline = time.monotonic() + 60
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def spec(wid):
    return t.Workload(id=wid, slice_id="s-1", command=["sleep", "60"], state=t.WORKLOAD_STATE_PENDING)


def test_a_reused_pid_of_another_workloads_shim_is_not_this_workloads(runner_dir):
    r = wl.WorkloadRunner(fake_agent(), runner_dir)
    r.start(spec("job1"))
    r.start(spec("job10"))          # its pid file's name contains "job1"
    first, other = r.meta["job1"]["shim_pid"], r.meta["job10"]["shim_pid"]
    os.killpg(first, signal.SIGKILL)
    wait_for(lambda: r.popens["job1"].poll() is not None, "job1's shim did not end")

    r2 = wl.WorkloadRunner(fake_agent(), runner_dir)       # the agent restarted: no Popen, /proc only
    r2.meta["job1"]["shim_pid"] = other        # job1's shim pid, recycled by job10's shim
    assert not r2.shim_running("job1")
    r2.stop("job1")
    # a wrong SIGTERM is sent synchronously; the shim outlives SIGTERM but its sleep child does not
    assert r2.shim_running("job10") and not os.path.exists(r2.path("job10", "exit")), \
        "stopping job1 signalled job10's process group"
    r2.check_all(report=False)
    assert r2.workloads["job1"].state == t.WORKLOAD_STATE_FAILED     # killed: no exit file
    assert r2.workloads["job10"].state == t.WORKLOAD_STATE_RUNNING
