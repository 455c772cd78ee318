"""Group commit: one task writes to etcd, many callers wait.

Callers hand in a list of ops and preconditions; the writer takes everything
queued at that moment (up to etcd's default 128 operations per transaction),
commits it as one guarded transaction, and resolves every caller with the
revision. If the merged transaction fails a precondition, each request is
retried alone so one conflict fails only its own caller.

The task is supervised: an unexpected exception (anything but the typed
errors the store raises) fails the writes it was carrying with UNAVAILABLE to
their callers, is logged, and the task starts again for the writes still
queued. After `max_restarts` failures within `restart_window` seconds the
writer gives up: every queued and later write fails at once, and `on_fatal`
(the server: health NOT_SERVING, step down as leader) is called.
"""

from __future__ import annotations

import asyncio
import logging
import time

from controlplane.state.store import Absent, Delete, EtcdStore, Present, Put, Revision
from mesh import errors
from mesh.logs import log as slog

log = logging.getLogger(__name__)
MAX_OPS = 120


class Writer:
    def __init__(self, store: EtcdStore, max_restarts: int = 5, restart_window: float = 60.0) -> None:
        self.store = store
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.writes = 0
        self.restarts = 0
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.failed: str = ""          # why the writer gave up ('' while it works)
        self.on_fatal: list = []       # callbacks (why) once it gives up
        self._inflight: list = []      # the batch being committed now
        self._next = None              # a write taken from the queue that did not fit the batch: first of the next

    def start(self) -> None:
        self.task = asyncio.create_task(self._supervise(), name="etcd-writer")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self._fail(self._inflight, errors.Unavailable("the control plane is stopping"))
        self._drain(errors.Unavailable("the control plane is stopping"))

    async def write(self, ops: list[Put | Delete], conditions: list[Absent | Present | Revision] = ()) -> int:
        if self.failed:
            raise errors.Unavailable(f"the etcd writer of this control plane failed ({self.failed}); it stepped "
                                     f"down: retry at the new leader")
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((list(ops), list(conditions), fut))
        return await fut

    @staticmethod
    def _fail(batch, e: Exception) -> None:
        for _, _, fut in batch:
            if not fut.done():
                fut.set_exception(e)

    def _drain(self, e: Exception) -> None:
        if self._next is not None:
            self._fail([self._next], e)
            self._next = None
        while not self.queue.empty():
            self._fail([self.queue.get_nowait()], e)

    async def _supervise(self) -> None:
        recent: list[float] = []
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the supervisor's job: whatever it was, fail and restart
                now = time.monotonic()
                recent = [t for t in recent if now - t < self.restart_window] + [now]
                self.restarts += 1
                slog(log, logging.ERROR, "etcd writer failed unexpectedly; failing its in-flight writes",
                     error=repr(e), writes=len(self._inflight), restarts=self.restarts)
                log.exception("etcd writer failed")
                self._fail(self._inflight, errors.Unavailable(
                    f"the etcd writer failed ({type(e).__name__}: {e}); whether this write was applied is "
                    f"unknown: read the object back before retrying"))
                self._inflight = []
                if len(recent) > self.max_restarts:
                    self.failed = f"{len(recent)} failures in {self.restart_window:g}s, last {type(e).__name__}: {e}"
                    slog(log, logging.CRITICAL, "etcd writer cannot be restarted: giving up", why=self.failed)
                    self._drain(errors.Unavailable(f"the etcd writer failed ({self.failed})"))
                    for cb in self.on_fatal:
                        try:
                            res = cb(self.failed)
                            if asyncio.iscoroutine(res):
                                await res
                        except Exception:  # noqa: BLE001 - every callback gets its turn
                            log.exception("writer on_fatal callback failed")
                    return
                await asyncio.sleep(min(0.05 * 2 ** len(recent), 2.0))

    async def _run(self) -> None:
        while True:
            first, self._next = self._next, None
            if first is None:
                first = await self.queue.get()
            self._inflight = [first]
            # Let the callbacks that are ready in this loop iteration queue their writes too: under
            # load the transaction then carries several callers' writes (one etcd round trip).
            await asyncio.sleep(0)
            batch = self._inflight
            n = len(first[0]) + len(first[1])
            # never past MAX_OPS in all (etcd refuses a transaction of more than 128 operations, and the merged
            # one would fail every caller in it); a write that does not fit starts the next batch
            while not self.queue.empty() and n < MAX_OPS:
                item = self.queue.get_nowait()
                size = len(item[0]) + len(item[1])
                if n + size > MAX_OPS:
                    self._next = item
                    break
                batch.append(item)
                n += size
            await self._commit(batch)
            self._inflight = []

    async def _commit(self, batch) -> None:
        for group in self._groups(batch):
            await self._commit_group(group)

    async def _commit_group(self, batch) -> None:
        self.batches += 1
        self.writes += len(batch)
        if len(batch) > 1:
            ops = [o for b in batch for o in b[0]]
            conds = [c for b in batch for c in b[1]]
            try:
                rev = await self.store.commit(ops, conds)
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(rev)
                return
            except errors.Aborted:
                pass  # find the culprit: retry one by one below
            except errors.MeshError as e:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                return
        for ops, conds, fut in batch:
            try:
                rev = await self.store.commit(ops, conds)
                if not fut.done():
                    fut.set_result(rev)
            except errors.MeshError as e:
                if not fut.done():
                    fut.set_exception(e)

    @staticmethod
    def _groups(batch):
        """Split in order so that no transaction touches one key twice (etcd refuses that)."""
        groups, current, seen = [], [], set()
        for item in batch:
            item_keys = {o.key for o in item[0]}
            if item_keys & seen:
                groups.append(current)
                current, seen = [], set()
            current.append(item)
            seen |= item_keys
        if current:
            groups.append(current)
        return groups
