"""A workload's log streamed to the control plane (`meshctl logs [-f]`): the last lines (at most the log's
last LOG_READ_CAP bytes, nodeagent/procfiles.py), then what the workload appends while it runs, in
LogChunks of at most CHUNK bytes; one task per request, cancelled by a LogRequest with `cancel`. A follow
goes on with a same-node migration's target once it takes the workload's ID (its log from the start), and
ends when the workload ends or its record goes. Composed into the agent's WorkloadRunner
(nodeagent/workloads.py)."""

from __future__ import annotations

import asyncio
import logging
import threading

from gpumesh.v1 import node_service_pb2
from gpumesh.v1 import types_pb2 as W
from mesh.logs import log
from nodeagent.procfiles import _read_from, _tail
from nodeagent.workload_logcap import compact

logger = logging.getLogger("nodeagent.workloads")
CHUNK = 32 << 10
OUTBOX_SHARE = 4        # a follow waits while the outbox holds more than 1/OUTBOX_SHARE of its bounds


def crowded(outbox) -> bool:
    """Whether the agent's outbox (mesh/outbox.py: it ends the stream when full) already holds a quarter of
    what it may: a followed log that a workload writes faster than the control plane reads then waits,
    instead of filling the outbox and forcing every other report through a reconnect and resync."""
    limit, max_bytes = getattr(outbox, "limit", 0), getattr(outbox, "max_bytes", 0)
    return bool(limit and outbox.qsize() * OUTBOX_SHARE > limit) or \
        bool(max_bytes and getattr(outbox, "bytes", 0) * OUTBOX_SHARE > max_bytes)


class LogStreamer:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.tasks: dict[str, asyncio.Task] = {}
        self.lock = threading.Lock()        # a read never sees a log half compacted (workload_logcap.py)
        self.cut: dict[str, int] = {}       # log path -> bytes removed from its front so far

    def cap(self, paths: list[str], max_bytes: int) -> dict[str, int]:
        """Keep each log in `paths` within `max_bytes` (workload_logcap.py; in a thread: a compaction moves
        up to half the bound). {path: bytes removed} of those compacted."""
        removed = {}
        for path in paths:
            with self.lock:
                n = compact(path, max_bytes)
                if n:
                    self.cut[path] = self.cut.get(path, 0) + n
                    removed[path] = n
        return removed

    async def cap_running(self) -> None:
        """The running workloads' logs kept within the runner's `log_max_bytes` (workload_logcap.py): started
        by the runner's monitor beside itself, since a compaction moves up to the bound."""
        r = self.runner
        paths = {r.path(wid, "log"): wid for wid, w in r.workloads.items()
                 if w.state == W.WORKLOAD_STATE_RUNNING and not r.meta.get(wid, {}).get("frozen")}
        try:
            cut = await asyncio.to_thread(self.cap, list(paths), r.log_max_bytes)
        except OSError as e:
            log(logger, logging.WARNING, "cannot keep a workload log within its bound", node=r.agent.node,
                error=str(e))
            return
        for path, n in cut.items():
            log(logger, logging.INFO, "workload log cut to stay within workload_log_max_bytes", node=r.agent.node,
                workload=paths[path], removed_bytes=n, max_bytes=r.log_max_bytes)

    def _tail(self, path: str, lines: int) -> tuple[bytes, int]:
        """`_tail` of the log, and where it ends counted from the log's first byte ever (cut ones too)."""
        with self.lock:
            data, size = _tail(path, lines)
            return data, size + self.cut.get(path, 0)

    def _read_from(self, path: str, offset: int) -> tuple[bytes, int]:
        """`_read_from` at `offset` counted from the log's first byte ever (a cut one: from what is left)."""
        with self.lock:
            cut = self.cut.get(path, 0)
            data, end = _read_from(path, max(0, offset - cut))
            return data, end + cut

    async def on_logs(self, req: node_service_pb2.LogRequest, outbox: asyncio.Queue) -> None:
        if req.cancel:
            task = self.tasks.pop(req.request_id, None)
            if task is not None:
                task.cancel()
            return
        task = asyncio.get_running_loop().create_task(self._stream_log(req, outbox))
        self.tasks[req.request_id] = task
        task.add_done_callback(lambda _t, rid=req.request_id: self.tasks.pop(rid, None))

    async def _stream_log(self, req: node_service_pb2.LogRequest, outbox: asyncio.Queue) -> None:
        def chunk(data: bytes = b"", eof: bool = False, error: str = "") -> None:
            outbox.put_nowait(node_service_pb2.AgentMessage(log=node_service_pb2.LogChunk(
                request_id=req.request_id, data=data, eof=eof, error=error)))

        if req.workload_id not in self.runner.workloads:
            chunk(eof=True, error=f"no workload {req.workload_id!r} on node {self.runner.agent.node}")
            return
        path = self.runner.path(req.workload_id, "log")
        try:
            data, offset = await asyncio.to_thread(self._tail, path, req.tail_lines)
        except OSError as e:
            chunk(eof=True, error=f"cannot read the log: {e.strerror}")
            return
        for i in range(0, len(data), CHUNK):
            chunk(data[i:i + CHUNK])
        while req.follow:
            while crowded(outbox):
                await asyncio.sleep(self.runner.poll_interval)
            w = self.runner.workloads.get(req.workload_id)
            finished = w is None or w.state != W.WORKLOAD_STATE_RUNNING     # None: its record expired meanwhile
            if w is not None and (now := self.runner.path(req.workload_id, "log")) != path:
                path, offset = now, 0   # a same-node migration's target took the ID: its log, from its start
            more, offset = await asyncio.to_thread(self._read_from, path, offset)
            for i in range(0, len(more), CHUNK):
                chunk(more[i:i + CHUNK])
            if finished and not more:
                break
            if not more:
                await asyncio.sleep(self.runner.poll_interval)
        chunk(eof=True)
