"""STOP_TARGET (a rollback) that reaches the target agent while the target's start is in flight: a transparent
target is restored in the transfer server's thread, beside the agent's loop, and its record is PENDING until
the restoring shim runs. The stop waits for the start to settle and stops what it started; before, it answered
TARGET_STOPPED at once and the restored copy then ran (held) beside the source restored by the rollback."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import types

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from nodeagent import workloads as wl
from nodeagent.migrate import MigrationAgent


def agent_with_slice(ready: bool = True) -> types.SimpleNamespace:
    """An agent stand-in for a WorkloadRunner and a MigrationAgent: node n1, with slice s-1 READY (or none)."""
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY,
                                                      device_uuid="GPU-x")} if ready else {}
    return a


async def test_a_stop_of_a_target_being_started_stops_it_once_started(tmp_path, monkeypatch):
    a = agent_with_slice()
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), stop_grace=5)
    m = MigrationAgent(a, r)
    launched, go_on = threading.Event(), threading.Event()

    def hold(self, where):
        if where == "after-launch":          # the supervisor runs; the start has not returned yet
            launched.set()
            go_on.wait(30)
    monkeypatch.setattr(wl.WorkloadRunner, "_crash_point", hold)
    spec = t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"])
    starting = threading.Thread(target=r.start, args=(spec,), kwargs={"meta": {"migration": "m-1"}})
    starting.start()
    try:
        assert await asyncio.to_thread(launched.wait, 30)
        assert r.workloads["w-1"].state == t.WORKLOAD_STATE_PENDING
        asyncio.get_running_loop().call_later(0.3, go_on.set)
        reports = []
        await m._stop_target(M.MigrationCommand(migration_id="m-1", action=M.MigrationCommand.STOP_TARGET,
                                                workload_id="w-1"), lambda event, **k: reports.append(event))
        await asyncio.to_thread(starting.join, 30)
        assert reports == [M.MigrationReport.TARGET_STOPPED]
        assert r.workloads["w-1"].state != t.WORKLOAD_STATE_RUNNING, "the target runs on after its stop"
    finally:
        go_on.set()
        starting.join(30)
        if r.meta.get("w-1", {}).get("shim_pid"):
            try:
                os.killpg(r.meta["w-1"]["shim_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_images_committed_after_the_target_was_stopped_are_not_restored(tmp_path):
    """The commit's restore runs in the transfer server's thread; one that comes after STOP_TARGET released the
    target (the rollback) restores nothing: it would be a second copy that no step stops."""
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"))
    m = MigrationAgent(a, r)
    m._release_target_job("m-1")            # STOP_TARGET ran: no receiver for this migration here any more
    images = tmp_path / "images"
    images.mkdir()
    try:
        m._restore_target(t.Workload(id="w-1", slice_id="s-1", command=["sleep", "60"]), "m-1", images,
                          {"log_key": "x"})
        raise AssertionError("restored after the rollback")
    except RuntimeError as e:
        assert "rolled back" in str(e)
    assert "w-1" not in r.workloads
