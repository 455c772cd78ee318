"""Group commit: one task writes to etcd, many callers wait.

Callers hand in a list of ops and preconditions; the writer takes everything
queued at that moment (up to etcd's default 128 operations per transaction),
commits it as one guarded transaction, and resolves every caller with the
revision. If the merged transaction fails a precondition, each request is
retried alone so one conflict fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.store import Absent, Delete, EtcdStore, Present, Put
from mesh import errors

log = logging.getLogger(__name__)
MAX_OPS = 120


class Writer:
    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="etcd-writer")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def write(self, ops: list[Put | Delete], conditions: list[Absent | Present] = ()) -> int:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((list(ops), list(conditions), fut))
        return await fut

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            # Let the callbacks that are ready in this loop iteration queue their writes too: under
            # load the transaction then carries several callers' writes (one etcd round trip).
            await asyncio.sleep(0)
            batch = [first]
            n = len(first[0]) + len(first[1])
            while not self.queue.empty() and n < MAX_OPS:
                item = self.queue.get_nowait()
                batch.append(item)
                n += len(item[0]) + len(item[1])
            await self._commit(batch)

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
