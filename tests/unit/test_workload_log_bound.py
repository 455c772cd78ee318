"""A running workload's log is kept within the agent's `workload_log_max_bytes` (nodeagent/workload_logcap.py):
past it the log keeps its last half, from a line's start, and a follow (`meshctl logs -f`) goes on where it
was. Before, the log grew as long as the workload wrote, in the agent's state directory."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import types
from types import SimpleNamespace as NS

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh.outbox import Outbox
from nodeagent import workloads as wl
from nodeagent.workload_logcap import compact
from nodeagent.workload_logs import LogStreamer


def _lines(first: int, count: int) -> bytes:
    return b"".join(b"line %06d %s\n" % (i, b"x" * 40) for i in range(first, first + count))


def test_compaction_keeps_the_last_half_from_a_lines_start(tmp_path):
    log = tmp_path / "w.log"
    log.write_bytes(_lines(0, 2000))        # 2000 lines of 53 bytes
    assert compact(str(log), 200_000) == 0 and log.stat().st_size == 2000 * 53     # within the bound
    removed = compact(str(log), 50_000)
    kept = log.read_bytes()
    assert removed + len(kept) == 2000 * 53 and len(kept) <= 25_000
    assert kept.startswith(b"line ") and kept == _lines(2000 - len(kept) // 53, len(kept) // 53)


async def test_a_follow_goes_on_where_it_was_across_a_compaction(tmp_path):
    log = tmp_path / "w-1.log"
    log.write_bytes(_lines(0, 1000))
    runner = NS(workloads={"w-1": NS(state=t.WORKLOAD_STATE_RUNNING)}, agent=NS(node="n1"), poll_interval=0.01,
                path=lambda wid, ext: str(log))
    streamer, outbox = LogStreamer(runner), Outbox(limit=10_000, max_bytes=1 << 30)
    await streamer.on_logs(node_service_pb2.LogRequest(request_id="r", workload_id="w-1", follow=True), outbox)
    got = bytearray()

    async def until(n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < n:
            assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {n} bytes came"
            if outbox.empty():
                await asyncio.sleep(0.01)
            else:
                got.extend(outbox.get_nowait().log.data)
    await until(1000 * 53)
    assert streamer.cap([str(log)], 20_000) == {str(log): 1000 * 53 - log.stat().st_size}
    with open(log, "ab") as f:
        f.write(_lines(1000, 100))
    await until(1100 * 53)
    assert bytes(got) == _lines(0, 1100)    # nothing again, nothing missing
    runner.workloads["w-1"].state = t.WORKLOAD_STATE_SUCCEEDED


async def test_the_runner_keeps_a_running_workloads_log_within_the_bound(tmp_path):
    a = types.SimpleNamespace(node="n1", desired={}, handlers={}, session_hooks=[], teardown_hooks=[],
                              claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    a.realized = {"s-1": node_service_pb2.SliceStatus(slice_id="s-1", state=t.SLICE_STATE_READY, device_uuid="GPU-x")}
    r = wl.WorkloadRunner(a, str(tmp_path / "w"), poll_interval=0.05, log_max_bytes=1 << 20)
    code = "import sys, time\nfor i in range(100000): sys.stdout.write('%07d %s\\n' % (i, 'y' * 72))\n" \
           "sys.stdout.flush()\ntime.sleep(120)"          # 8 MB, then it stays running
    await asyncio.to_thread(r.start, t.Workload(id="w-1", slice_id="s-1", command=[sys.executable, "-c", code]))
    r.on_session(asyncio.Queue())           # starts the monitor
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            size = os.path.getsize(r.path("w-1", "log"))
            data = open(r.path("w-1", "log"), "rb").read()
            if data.endswith(b"%07d %s\n" % (99999, b"y" * 72)) and size <= 1 << 20:
                break
            assert asyncio.get_running_loop().time() < deadline, f"the log holds {size} bytes"
            await asyncio.sleep(0.05)
        assert len(data) % 81 == 0 and data.count(b"\n") == len(data) // 81     # whole lines
        assert r.workloads["w-1"].state == t.WORKLOAD_STATE_RUNNING
    finally:
        r.monitor.cancel()
        os.killpg(r.meta["w-1"]["shim_pid"], signal.SIGKILL)


def test_a_compaction_ends_even_when_the_workload_writes_faster_than_it_moves(tmp_path, monkeypatch):
    """A writer that appends as fast as the compaction moves (a tenant flooding its log) never holds the
    compaction (and the log's lock, which every read of the log waits for) for good: it moves at most the
    bound, then cuts what is left."""
    import nodeagent.workload_logcap as logcap
    log = tmp_path / "w.log"
    log.write_bytes(_lines(0, 2000))
    real_pread, appended = os.pread, [0]

    def pread_while_flooded(fd, n, offset):
        if appended[0] < 10_000:         # each read finds as much again appended: the end is never reached
            with open(log, "ab") as f:
                f.write(b"z" * 1000)
            appended[0] += 1
        return real_pread(fd, n, offset)
    monkeypatch.setattr(logcap.os, "pread", pread_while_flooded)
    monkeypatch.setattr(logcap, "MOVE_CHUNK", 1000)
    removed = compact(str(log), 50_000)
    assert appended[0] < 10_000, "the compaction ran as long as the flood"
    assert os.path.getsize(log) <= 50_000 and removed > 0
