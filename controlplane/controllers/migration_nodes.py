"""A node's migrations (the MigrationManager's part for them): a drain migrates every running workload off a
cordoned node and waits; a deleted node's unfinished migrations end through their own state machine."""

from __future__ import annotations

import asyncio
import logging

from controlplane.controllers.migration_phases import FINISHED, W
from gpumesh.v1 import migration_service_pb2 as M
from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.migrations")


class NodesMixin:
    async def drain(self, node: str, skip_slices: set[str] = frozenset()) -> list[M.Migration]:
        """Migrate every running workload off `node` (already cordoned, so the scheduler places the
        targets elsewhere) and wait for the migrations to finish. Workloads on `skip_slices` (model
        replicas, which their deployment replaces instead) stay."""
        started = []
        for w in list(self.wm.workloads.values()):
            if w.slice_id in skip_slices:
                continue
            if w.node == node and w.state == W.WORKLOAD_STATE_RUNNING and self.active_for(w.id) is None:
                try:
                    started.append(await self.migrate(w.id, reason="drain"))
                except errors.MeshError as e:
                    log(logger, logging.WARNING, "drain: cannot migrate", workload=w.id, error=str(e))
        for m in started:
            task = self.tasks.get(m.id)
            if task is not None:
                await asyncio.wait([task], timeout=self.copy_timeout)
        return [self.migrations[m.id] for m in started]

    def unfinished_for(self, node: str) -> list[str]:
        """The migrations from or to `node` that have not reached their last phase. A restore only names the node
        its workload last ran on (`source_node`; it reads the checkpoint store), so it is one only to its target."""
        return [m.id for m in self.migrations.values() if m.phase not in FINISHED and (
            node == m.target_node or (node == m.source_node and not m.checkpoint_id))]

    async def end_for_node(self, node: str, timeout: float) -> list[str]:
        """A deleted node (controllers/nodedelete.py; `node` is in ctl.deleted_nodes): the unfinished migrations
        from or to it end through their own state machine, since every step asked of the node (or, before the
        commit, of its peer) now fails at once: before the commit they roll back (the source resumes where it
        lives; a source on the deleted node is FAILED already and is not waited for), after it they finish.
        Waits up to `timeout` for them; the ids."""
        ids = self.unfinished_for(node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # a resize reserving its target starts the state machine itself: one started here was a second writer
        reserving = [self.reserving[mid] for mid in ids if mid in self.reserving]
        if reserving:
            await asyncio.wait(reserving, timeout=timeout)
        for mid in ids:
            if mid not in self.tasks and mid not in self.reserving:
                self._spawn(mid)
        tasks = [self.tasks[mid] for mid in ids if mid in self.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        return ids
