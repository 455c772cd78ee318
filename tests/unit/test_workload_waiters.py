"""A call that waits for a workload (Run, Stop) and times out or is cancelled leaves no future behind: a client
that kept asking about a workload that never changed grew `WorkloadManager.waiters` for as long as it lived."""

from __future__ import annotations

import asyncio

from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from gpumesh.v1 import types_pb2 as t


async def test_timed_out_and_cancelled_waits_leave_no_waiter():
    wm = WorkloadManager(Controller(store=None))
    wm.workloads["w-1"] = t.Workload(id="w-1", node="n1", state=t.WORKLOAD_STATE_PENDING)
    started = lambda w: w.state != t.WORKLOAD_STATE_PENDING   # noqa: E731
    for _ in range(20):
        assert (await wm._wait_until("w-1", started, 0.01)).state == t.WORKLOAD_STATE_PENDING
    assert wm.waiters == {}
    task = asyncio.create_task(wm._wait_until("w-1", started, 30))
    await asyncio.sleep(0.01)
    assert len(wm.waiters["w-1"]) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert wm.waiters == {}
    # a wait that is answered still gets its answer
    task = asyncio.create_task(wm._wait_until("w-1", started, 30))
    await asyncio.sleep(0.01)
    for fut in wm.waiters.pop("w-1"):
        fut.set_result(None)
    wm.workloads["w-1"] = t.Workload(id="w-1", node="n1", state=t.WORKLOAD_STATE_RUNNING)
    assert (await task).state == t.WORKLOAD_STATE_RUNNING and wm.waiters == {}
