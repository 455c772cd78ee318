"""The runner's monitor runs on the event loop while a start runs in a worker thread: the workload is
published RUNNING only once its pid is known and it is attached to its device (and an isolated one has its
network). Before, the monitor could see it RUNNING without a pid, read the pid file and attach it too: a
second simulated NVML process and MPS client of the same pid (the simulated MPS server then counted its
memory twice and could refuse it, killing the workload)."""

from __future__ import annotations

import os
import signal
import types

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl


def test_the_monitor_between_the_state_and_the_pid_does_not_attach_the_workload_twice(tmp_path, monkeypatch):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"))
    attached = []
    real_attach = wl.WorkloadRunner._attach
    monkeypatch.setattr(wl.WorkloadRunner, "_attach", lambda self, wid, pid: (attached.append(pid),
                                                                               real_attach(self, wid, pid)))
    real_ts = wl._ts

    def ts_with_the_monitor(*args):
        # the start stamps started_at as it publishes the workload: the monitor's round may come right then
        w = r.workloads.get("w-1")
        if w is not None and w.state == t.WORKLOAD_STATE_RUNNING:
            r.check_all(report=False)
        return real_ts(*args)
    monkeypatch.setattr(wl, "_ts", ts_with_the_monitor)
    try:
        w = r.start(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]))
        assert w.state == t.WORKLOAD_STATE_RUNNING and w.pid and attached == [w.pid]
    finally:
        os.killpg(r.meta["w-1"]["shim_pid"], signal.SIGKILL)
