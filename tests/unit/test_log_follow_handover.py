"""A followed log (`meshctl logs -f`) across a same-node migration: when the target takes the workload's ID
(nodeagent/workload_recovery.py `finish_hand_over`: the ID then names the target's record and its log, the
source's log is no longer the workload's), the follow goes on with the target's log from its start. Before,
it kept reading the source's log, which no longer grows, and showed nothing of the running workload. And a
record that goes while followed (expired) ends the follow instead of leaving it without an end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as W
from mesh.outbox import Outbox
from nodeagent.workload_logs import LogStreamer


async def _next(outbox, deadline_s=30):
    deadline = asyncio.get_running_loop().time() + deadline_s
    while outbox.empty():
        assert asyncio.get_running_loop().time() < deadline, "no chunk came"
        await asyncio.sleep(0.01)
    return outbox.get_nowait().log


async def test_a_followed_log_goes_on_with_the_target_after_a_hand_over(tmp_path):
    files = {"w-1": tmp_path / "w-1.log"}
    files["w-1"].write_bytes(b"source\n")
    runner = NS(workloads={"w-1": NS(state=W.WORKLOAD_STATE_RUNNING)}, agent=NS(node="n1"), poll_interval=0.01,
                path=lambda wid, ext: str(files[wid]))
    outbox = Outbox(limit=1000, max_bytes=1 << 30)
    await LogStreamer(runner).on_logs(node_service_pb2.LogRequest(request_id="r", workload_id="w-1", follow=True),
                                      outbox)
    assert (await _next(outbox)).data == b"source\n"
    target = tmp_path / "w-1~m-1.log"
    target.write_bytes(b"target restored\n")
    files["w-1"] = target                                   # the hand-over: the ID names the target's files
    runner.workloads["w-1"] = NS(state=W.WORKLOAD_STATE_RUNNING)
    assert (await _next(outbox)).data == b"target restored\n"
    runner.workloads["w-1"].state = W.WORKLOAD_STATE_SUCCEEDED
    assert (await _next(outbox)).eof


async def test_a_follow_ends_when_the_record_goes(tmp_path):
    log = tmp_path / "w-1.log"
    log.write_bytes(b"line\n")
    runner = NS(workloads={"w-1": NS(state=W.WORKLOAD_STATE_RUNNING)}, agent=NS(node="n1"), poll_interval=0.01,
                path=lambda wid, ext: str(log))
    outbox = Outbox(limit=1000, max_bytes=1 << 30)
    await LogStreamer(runner).on_logs(node_service_pb2.LogRequest(request_id="r", workload_id="w-1", follow=True),
                                      outbox)
    assert (await _next(outbox)).data == b"line\n"
    del runner.workloads["w-1"]
    assert (await _next(outbox)).eof
