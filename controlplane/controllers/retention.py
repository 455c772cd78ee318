"""Retention: finished records expire, with their files, so etcd and memory stay flat.

A sweep every `retention_interval_seconds` finds

* workloads that ended (SUCCEEDED, FAILED, STOPPED) more than `retention_seconds` ago, unless a
  migration of theirs is still in progress;
* migrations that finished (DONE, ABORTED) more than `retention_seconds` ago;
* checkpoint records older than `retention_seconds`, those beyond the newest `checkpoints_kept` of
  their workload, and those of an expiring workload (a restore needs the workload's record), unless
  an unfinished migration restores from them;
* events (controlplane/events/) that last happened more than `events_retention_seconds` ago, and the
  oldest beyond the newest `events_kept`;

deletes their etcd keys through the writer (at most MAX_OPS keys per transaction), then drops them
from memory, and removes their files through the agents: WorkloadCommand.forget (the agent deletes
the workload's record and log file) to the workload's node, and MigrationCommand DELETE_CHECKPOINT to
a connected agent (the store is shared by the nodes; the checkpoint's own node first). An agent that
is not connected at that moment is told about its expired workloads when it next reports them (those
IDs are remembered, at most REMEMBERED of them). Standbys follow the deletes through their etcd watch.
"""

from __future__ import annotations

import collections
import logging
import time

from controlplane.loops import PeriodicTask
from controlplane.state import keys
from controlplane.state.store import Delete
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)

W = types_pb2
TERMINAL = (W.WORKLOAD_STATE_SUCCEEDED, W.WORKLOAD_STATE_FAILED, W.WORKLOAD_STATE_STOPPED)
FINISHED = (M.MIGRATION_PHASE_DONE, M.MIGRATION_PHASE_ABORTED)
MAX_OPS = 100
REMEMBERED = 100_000          # expired workload IDs remembered for agents that were away


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


class Retention:
    def __init__(self, ctl, workloads, migrations, retention_s: float = 7 * 86400.0, checkpoints_kept: int = 10,
                 interval: float = 60.0, events=None, events_retention_s: float = 86400.0,
                 events_kept: int = 10_000) -> None:
        self.ctl = ctl
        self.wm = workloads
        self.mm = migrations
        self.retention_s = retention_s
        self.checkpoints_kept = checkpoints_kept
        self.interval = interval
        self.events = events                            # the EventLog, or None
        self.events_retention_s = events_retention_s
        self.events_kept = events_kept
        self.expired = collections.Counter()           # kind -> records expired (metrics, tests)
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._loop = PeriodicTask("retention", self.sweep, interval=lambda: self.interval,
                                  on_error=self._sweep_failed)
        workloads.expired_ids = self.recent            # _report tells a returning agent to forget them

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    @staticmethod
    def _sweep_failed(e: Exception) -> None:
        if isinstance(e, errors.MeshError):
            log(logger, logging.WARNING, "retention sweep failed; retrying at the next one", error=str(e))
        else:   # a sweep's bug must not stop later sweeps
            logger.error("retention sweep failed", exc_info=e)

    # -- what expires --------------------------------------------------------------------------

    def _busy(self) -> tuple[set[str], set[str]]:
        """(workload IDs, checkpoint IDs) an unfinished migration needs, a Restore whose record is being
        written included."""
        if self.mm is None:
            return set(), set()
        active = [m for m in self.mm.migrations.values() if m.phase not in FINISHED]
        active += list(getattr(self.mm, "planning", {}).values())
        return {m.workload_id for m in active}, {m.checkpoint_id for m in active if m.checkpoint_id}

    def due(self, now: float | None = None) -> tuple[list, list, list]:
        """(workloads, migrations, checkpoints) that expire at `now` (seconds since the epoch)."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_s
        migrations = self.mm.migrations if self.mm is not None else {}
        checkpoints = self.mm.checkpoints if self.mm is not None else {}
        busy_workloads, busy_checkpoints = self._busy()
        workloads = [w for w in self.wm.workloads.values()
                     if w.state in TERMINAL and w.id not in busy_workloads
                     and _seconds(w.finished_at if w.HasField("finished_at") else w.created_at) < cutoff]
        gone = {w.id for w in workloads}
        finished = [m for m in migrations.values() if m.phase in FINISHED
                    and _seconds(m.updated_at if m.HasField("updated_at") else m.created_at) < cutoff]
        by_workload: dict[str, list] = {}
        for ck in checkpoints.values():
            by_workload.setdefault(ck.workload_id, []).append(ck)
        cks = []
        for wid, group in by_workload.items():
            group.sort(key=lambda c: (_seconds(c.created_at), c.id), reverse=True)
            for i, ck in enumerate(group):
                if ck.id in busy_checkpoints:
                    continue
                if wid in gone or i >= self.checkpoints_kept or _seconds(ck.created_at) < cutoff:
                    cks.append(ck)
        return workloads, finished, cks

    def events_due(self, now: float | None = None) -> list:
        """Event IDs that expire at `now`: too old, or beyond the newest `events_kept`."""
        if self.events is None:
            return []
        now = time.time() if now is None else now
        cutoff = now - self.events_retention_s
        ordered = self.events.oldest_first()
        over = max(0, len(ordered) - self.events_kept)
        return [ev.id for i, ev in enumerate(ordered) if i < over or _seconds(ev.last_timestamp) < cutoff]

    # -- expiring --------------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> dict:
        workloads, migrations, checkpoints = self.due(now)
        event_ids = self.events_due(now)
        items = ([("event", i, [Delete(keys.event(i))]) for i in event_ids]
                 + [("checkpoint", c, [Delete(keys.checkpoint(c.id)), Delete(keys.checkpoint_key(c.id))])
                    for c in checkpoints]
                 + [("migration", m, [Delete(keys.migration(m.id))]) for m in migrations]
                 + [("workload", w, [Delete(keys.workload(w.id))]) for w in workloads])
        done = await self._delete(items)
        event_ids, checkpoints, migrations, workloads = (done["event"], done["checkpoint"], done["migration"],
                                                         done["workload"])
        for i in event_ids:
            self.events.drop(i)
        for c in checkpoints:
            self.mm.checkpoints.pop(c.id, None)
            getattr(self.mm, "checkpoint_keys", {}).pop(c.id, None)   # its sealing key, deleted in etcd above
            self._delete_checkpoint_files(c)
        for m in migrations:
            self.mm.migrations.pop(m.id, None)
            for table in ("reports", "watchers", "_phases_emitted"):
                getattr(self.mm, table, {}).pop(m.id, None)
            task = getattr(self.mm, "tasks", {}).get(m.id)
            if task is not None and task.done():
                self.mm.tasks.pop(m.id, None)
        by_node: dict[str, list[str]] = {}
        for w in workloads:
            self.wm.workloads.pop(w.id, None)
            self.wm.revisions.pop(w.id, None)
            self.wm.stopping.discard(w.id)
            self.wm.waiters.pop(w.id, None)
            by_node.setdefault(w.node, []).append(w.id)
        for node, ids in by_node.items():
            session = self.ctl.sessions.get(node)
            if session is not None:
                session.send(node_service_pb2.ControllerMessage(workloads=node_service_pb2.WorkloadCommand(
                    forget=ids)))
                continue
            for wid in ids:                 # the agent is away: tell it when it reports them again
                self.recent[wid] = None
            while len(self.recent) > REMEMBERED:
                self.recent.popitem(last=False)
        counts = {"workloads": len(workloads), "migrations": len(migrations), "checkpoints": len(checkpoints),
                  "events": len(event_ids)}
        self.expired.update(counts)
        if any(counts.values()):
            log(logger, logging.INFO, "expired finished records", retention_s=self.retention_s, **counts)
        return counts

    async def _delete(self, items: list) -> dict[str, list]:
        """Delete `items` ((kind, record, ops)) in transactions of at most MAX_OPS keys; what was deleted, by
        kind. Between the writes a Restore (or a Migrate of a stopped workload) may begin: each chunk is judged
        again just before its write, and its checkpoints and workloads leave memory before it is written, so
        nothing can begin from a record whose keys are going (they come back if the write fails)."""
        done: dict[str, list] = {"event": [], "checkpoint": [], "migration": [], "workload": []}
        i = 0
        while i < len(items):
            chunk, n = [], 0
            while i < len(items) and (not chunk or n + len(items[i][2]) <= MAX_OPS):
                chunk.append(items[i])
                n += len(items[i][2])
                i += 1
            busy_workloads, busy_checkpoints = self._busy()
            chunk = [it for it in chunk if not (it[0] == "checkpoint" and it[1].id in busy_checkpoints)
                     and not (it[0] == "workload" and it[1].id in busy_workloads)]
            if not chunk:
                continue
            held_cks = {c.id: self.mm.checkpoints.pop(c.id) for k, c, _ in chunk
                        if k == "checkpoint" and c.id in self.mm.checkpoints}
            held_ws = {w.id: self.wm.workloads.pop(w.id) for k, w, _ in chunk
                       if k == "workload" and w.id in self.wm.workloads}
            try:
                await self.ctl.writer.write([op for _, _, ops in chunk for op in ops])
            except BaseException:
                self.mm.checkpoints.update(held_cks)
                self.wm.workloads.update(held_ws)
                raise
            for kind, record, _ in chunk:
                done[kind].append(record)
        return done

    def _delete_checkpoint_files(self, ck: M.CheckpointInfo) -> None:
        nodes = [ck.node] + sorted(n for n in self.ctl.sessions.by_node if n != ck.node)
        for node in nodes:
            session = self.ctl.sessions.get(node)
            if session is not None:
                session.send(node_service_pb2.ControllerMessage(migration=M.MigrationCommand(
                    migration_id=ck.id, action=M.MigrationCommand.DELETE_CHECKPOINT, path=ck.path,
                    tenant=ck.tenant, workload_id=ck.workload_id)))
                return
        log(logger, logging.WARNING, "no agent connected to delete an expired checkpoint's files", checkpoint=ck.id,
            path=ck.path)
