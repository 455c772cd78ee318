"""A followed log (`meshctl logs -f`) that its workload writes faster than the control plane reads waits for
room in the agent's bounded outbox (nodeagent/workload_logs.py `crowded`) instead of filling it: a full outbox
ends the agent's stream and forces a reconnect and resync of everything. Before, the follow queued every 1 MiB
read at once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as W
from mesh.outbox import Outbox
from nodeagent.workload_logs import CHUNK, LogStreamer


async def test_a_fast_log_followed_waits_for_the_outbox_and_loses_nothing(tmp_path):
    log = tmp_path / "w-1.log"
    log.write_bytes(b"started\n")
    w = NS(state=W.WORKLOAD_STATE_RUNNING)
    runner = NS(workloads={"w-1": w}, agent=NS(node="n1"), poll_interval=0.01, path=lambda wid, ext: str(log))
    outbox = Outbox(limit=80, max_bytes=128 * CHUNK)         # small bounds: a quarter is 20 chunks
    streamer = LogStreamer(runner)
    await streamer.on_logs(node_service_pb2.LogRequest(request_id="r", workload_id="w-1", follow=True), outbox)
    deadline = asyncio.get_running_loop().time() + 30       # the tail's answer (read in a thread): it now follows
    while outbox.empty() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert outbox.get_nowait().log.data == b"started\n"
    written = b"".join(bytes([65 + i % 26]) * 1000 + b"\n" for i in range(3000))      # ~3 MB, 94 chunks
    with open(log, "ab") as f:
        f.write(written)
    got, most = bytearray(), 0
    while True:
        await asyncio.sleep(0.02)                            # a slow reader
        most = max(most, outbox.qsize())
        assert not outbox.overflowed
        item = outbox.get_nowait() if not outbox.empty() else None
        if item is None:
            if len(got) == len(written):
                w.state = W.WORKLOAD_STATE_STOPPED
            continue
        got += item.log.data
        if item.log.eof:
            break
    assert bytes(got) == written and most <= 20 + 33, most   # a quarter, plus one 1 MiB read (32 chunks)
