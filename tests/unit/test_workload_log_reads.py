"""Reading a workload's log (`meshctl logs [--tail N]`) holds at most the log's last LOG_READ_CAP bytes in
the agent, whatever the workload wrote: a log of gigabytes, or one without a newline, is cut, and the
answer's first line says how much is not shown."""

from __future__ import annotations

import asyncio
import re
import tracemalloc
import types

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as t
from mesh.outbox import Outbox
from nodeagent import workloads as wl
from nodeagent.procfiles import LOG_READ_CAP, _tail

CUT = re.compile(rb"^\[\.\.\. the log's first (\d+) bytes are not shown: "
                 rb"one read returns at most its last 8 MiB \.\.\.\]\n")


def _sparse_log(path, size, tail=b"THE END"):
    """`size` bytes without a newline (a sparse file of NULs: no disk), ending with `tail`."""
    with open(path, "wb") as f:
        f.truncate(size - len(tail))
        f.seek(size - len(tail))
        f.write(tail)
    return str(path)


def test_a_whole_log_read_returns_its_last_bytes_and_says_what_was_cut(tmp_path):
    size = 64 << 20
    path = _sparse_log(tmp_path / "w.log", size)
    tracemalloc.start()
    try:
        data, offset = _tail(path, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    m = CUT.match(data)
    assert m and int(m.group(1)) == size - LOG_READ_CAP
    assert len(data) - m.end() == LOG_READ_CAP and data.endswith(b"THE END") and offset == size
    assert peak < 3 * LOG_READ_CAP            # the old code held the whole log (64 MiB) and more


def test_the_last_lines_of_a_log_without_newlines_stop_at_the_cap(tmp_path):
    cap = 1 << 20
    path = _sparse_log(tmp_path / "w.log", 16 << 20)
    data, offset = _tail(path, 5, cap=cap)
    m = CUT.match(data)
    assert m and int(m.group(1)) == (16 << 20) - cap and len(data) - m.end() == cap and offset == 16 << 20
    # lines that fit are returned whole, without a note
    with open(path, "ab") as f:
        f.write(b"\none\ntwo\nthree\n")
    assert _tail(path, 2, cap=cap) == (b"two\nthree\n", (16 << 20) + 15)
    small = tmp_path / "small.log"
    small.write_bytes(b"a\nb\nc")
    assert _tail(str(small), 2) == (b"b\nc", 5) and _tail(str(small), 0) == (b"a\nb\nc", 5)
    assert _tail(str(small), 10) == (b"a\nb\nc", 5)


def test_logs_asked_of_the_agent_are_bounded_whatever_the_workload_wrote(tmp_path):
    """The real runner's log streamer: a 40 MiB line costs the agent and the stream 8 MiB, not 40."""
    agent = types.SimpleNamespace(node="n1", desired={}, realized={}, handlers={}, session_hooks=[],
                                  teardown_hooks=[], claim_hooks=[], gpus=types.SimpleNamespace(nvml=object()))
    r = wl.WorkloadRunner(agent, str(tmp_path / "w"))
    r.workloads["w-1"] = t.Workload(id="w-1", slice_id="s-1", state=t.WORKLOAD_STATE_SUCCEEDED)
    size = 40 << 20
    _sparse_log(r.path("w-1", "log"), size)
    outbox = Outbox()

    async def ask():
        await r.logs.on_logs(node_service_pb2.LogRequest(request_id="l-1", workload_id="w-1"), outbox)
        while r.logs.tasks:
            await asyncio.sleep(0.01)
    asyncio.run(ask())
    chunks = []
    while not outbox.empty():
        chunks.append(outbox.get_nowait().log)
    assert not outbox.overflowed and chunks[-1].eof and not chunks[-1].error
    data = b"".join(c.data for c in chunks)
    m = CUT.match(data)
    assert m and int(m.group(1)) == size - LOG_READ_CAP and len(data) - m.end() == LOG_READ_CAP
