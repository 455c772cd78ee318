"""The GPU health controller: XIDs and lost GPUs, judged by the health policy
(controlplane/controllers/healthpolicy.py), turned into health, migrations, resets and events.

Per GPU::

    healthy --fatal XID (reset class)--> unhealthy[reset] --idle: GpuReset to the agent-->
        --"GpuReset" from the agent--> (waits for a clean reading) --> healthy
    healthy --fatal XID (reboot class) / GpuLost--> unhealthy[reboot] | lost
        --the GPU reads clean again (the node brought it back)--> healthy
    any fatal incident beyond the recurrence limit, a failed row remap, or too many failed
    resets --> quarantined --`meshctl gpu clear` (ClearGpuQuarantine)--> unhealthy[reset]

Marking a GPU anything but healthy stops placements on it (the scheduler's NodeHealth filter)
and live-migrates its running workloads through the migration manager's own entry point
(the one `meshctl migrate` and drain use); a workload that cannot migrate keeps running and
the event says so. The reset is asked of the agent only when no workload runs or is migrating
on the GPU; the agent refuses it too while processes use the GPU (nvidia-smi's semantics).

The record at `/gpumesh/v1/gpuhealth/<node>/<index>` (a GpuTelemetry) keeps the health, the
reason, the recovery awaited and the incidents of the window, so a restarted control plane
goes on where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import Counter

from controlplane.state import keys
from controlplane.state.fleet import GpuState
from controlplane.controllers.healthpolicy import QUARANTINE, REBOOT, RESET, HealthPolicy
from controlplane.state.store import Put
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
T = types_pb2
HEALTH_ENUM = {"healthy": T.GPU_HEALTH_HEALTHY, "unhealthy": T.GPU_HEALTH_UNHEALTHY, "lost": T.GPU_HEALTH_LOST,
               "quarantined": T.GPU_HEALTH_QUARANTINED}
HEALTH_NAME = {v: k for k, v in HEALTH_ENUM.items()}
OUT = ("unhealthy", "lost", "quarantined")
ACTIVE_WORKLOAD = (T.WORKLOAD_STATE_RUNNING, T.WORKLOAD_STATE_PENDING)
XIDS = Counter("gpumesh_gpu_xid_total", "XIDs the agents reported, by the policy's class and action",
               ["cls", "action"])
HEALTH_CHANGES = Counter("gpumesh_gpu_health_changes_total", "GPU health changes, by the new health", ["health"])
RESETS = Counter("gpumesh_gpu_resets_total", "GPU resets asked of agents and their results", ["result"])
MIGRATIONS = Counter("gpumesh_gpu_health_migrations_total", "Workloads the health policy moved off marked GPUs, "
                     "by whether the migration could start", ["result"])


@dataclass
class GpuRecord:
    """What the controller remembers of one GPU beyond GpuState.health."""
    incidents: list[float] = field(default_factory=list)
    recovery: str = ""                 # reset | reboot | operator | "" (healthy)
    reset_asked: float = 0.0           # when the last GpuReset was sent
    reset_failures: int = 0
    reset_done: float = 0.0            # when the agent said the reset was done (0: not yet)
    gone: bool = False                 # it left the bus (lost) in this incident
    migrated: set[str] = field(default_factory=set)   # workloads asked to move in this incident
    unsaved: types_pb2.GpuTelemetry | None = None      # the record a failed etcd write left to store


class HealthController:
    def __init__(self, tm, policy: HealthPolicy) -> None:
        self.tm = tm                    # the TelemetryManager: ctl, clock, record()
        self.ctl = tm.ctl
        self.policy = policy
        self.gpus: dict[tuple[str, int], GpuRecord] = {}
        self.tasks: set[asyncio.Task] = set()
        self.task_nodes: dict[asyncio.Task, str] = {}     # the node of each task's GPU (a deletion cancels them)

    def rec(self, g: GpuState) -> GpuRecord:
        return self.gpus.setdefault((g.node, g.index), GpuRecord())

    # -- restart ----------------------------------------------------------------------------

    def restore(self, g: GpuState, stored: types_pb2.GpuTelemetry) -> None:
        r = self.rec(g)
        r.incidents = [ts.ToNanoseconds() / 1e9 for ts in stored.incidents]
        g.health = HEALTH_NAME.get(stored.health, "unhealthy")
        r.recovery = stored.recovery if g.health != "healthy" else ""
        r.gone = g.health == "lost"
        if g.health != "healthy":
            g.telemetry = types_pb2.GpuTelemetry(index=g.index, health=stored.health,
                                                 health_reason=stored.health_reason)

    # -- inputs -------------------------------------------------------------------------------

    async def on_xid(self, g: GpuState, code: int) -> None:
        d = self.policy.decide(code)
        XIDS.labels(d.cls, d.action).inc()
        label = f"XID {code} ({d.cls} class: {d.action})"
        if not d.fatal:
            self.tm.record(g.node, "Normal", "XidError", f"GPU {g.index}: {label}; the GPU stays in service",
                           g.index)
            return
        self.tm.record(g.node, "Warning", "XidError", f"GPU {g.index}: {label}", g.index)
        recovery = {RESET: "reset", REBOOT: "reboot", QUARANTINE: "operator"}[d.action]
        await self._fault(g, f"XID {code}", recovery, quarantine=d.action == QUARANTINE)

    async def on_lost(self, g: GpuState, message: str) -> None:
        await self._fault(g, message, "reboot", lost=True)
        if g.health != "healthy":
            self.rec(g).gone = True

    async def on_reset_result(self, g: GpuState, ok: bool, message: str) -> None:
        r = self.rec(g)
        RESETS.labels("done" if ok else "refused").inc()
        if ok:
            r.reset_done = self.tm.clock()
            return
        r.reset_failures += 1
        if "in use" not in message.lower() and r.reset_failures >= self.policy.max_reset_attempts:
            await self._set(g, "quarantined", f"{r.reset_failures} GPU resets failed (last: {message})", "operator")

    async def on_reading(self, g: GpuState, reading: types_pb2.GpuTelemetry) -> None:
        """A GPU present in the agent's telemetry: move its recovery on."""
        r = self.rec(g)
        if r.unsaved is not None:
            try:
                await self._store(g, r)
            except errors.MeshError as e:
                log(logger, logging.WARNING, "GPU health record not stored yet; retrying at the next reading",
                    node=g.node, gpu=g.index, error=str(e))
        if g.health == "healthy" or g.health == "quarantined":
            return
        if reading.remap_failed:
            await self._set(g, "quarantined", "row remapping failed: the GPU needs service", "operator")
            return
        clean = not (reading.remap_pending or reading.retired_pages_pending or reading.ecc_uncorrected)
        if r.recovery == "reboot" or g.health == "lost":
            if clean and r.gone:
                await self._recovered(g, "it is back on the bus and reads clean")
            return
        if r.recovery != "reset" or not self.policy.recovery:
            return
        if r.reset_done:
            if clean:
                await self._recovered(g, "reset; its readings are clean (no pending row remap or page "
                                         "retirement, no uncorrected ECC errors)")
                return
            r.reset_done = 0.0       # the reset did not clear it: try again (bounded by max_reset_attempts)
            r.reset_failures += 1
            if r.reset_failures >= self.policy.max_reset_attempts:
                await self._set(g, "quarantined", "resets did not clear the GPU's memory errors", "operator")
                return
        self._migrate_off(g, r)
        now = self.tm.clock()
        if now - r.reset_asked < self.policy.reset_retry_seconds:
            return
        busy = self._busy(g)
        if busy:
            return
        session = self.ctl.sessions.get(g.node)
        if session is None:
            return
        r.reset_asked = now
        RESETS.labels("asked").inc()
        session.send(node_service_pb2.ControllerMessage(gpu_reset=node_service_pb2.GpuReset(
            gpu_index=g.index, reason=g.telemetry.health_reason if g.telemetry is not None else "")))
        self.tm.record(g.node, "Normal", "GpuResetRequested", f"GPU {g.index} is idle: asked the agent to reset it",
                       g.index)

    async def clear(self, g: GpuState) -> None:
        """The operator takes the GPU out of quarantine (or out of a wait for a reboot): its history
        is forgotten; it recovers through a reset (or, with recovery off, returns at once)."""
        r = self.rec(g)
        r.gone = False
        r.incidents, r.reset_failures, r.reset_done, r.reset_asked = [], 0, 0.0, 0.0
        self.tm.record(g.node, "Normal", "GpuQuarantineCleared", f"GPU {g.index}: quarantine cleared by an operator",
                       g.index)
        if self.policy.recovery:
            await self._set(g, "unhealthy", "quarantine cleared: recovering (reset, then clean readings)", "reset")
        else:
            await self._set(g, "healthy", "", "")

    # -- transitions -----------------------------------------------------------------------------

    async def _fault(self, g: GpuState, reason: str, recovery: str, quarantine: bool = False,
                     lost: bool = False) -> None:
        r = self.rec(g)
        now = self.tm.clock()
        if g.health == "quarantined":
            return
        if g.health in ("unhealthy", "lost") and not r.reset_done:
            # The same incident (XIDs come in bursts): a harder recovery wins, nothing is counted.
            if quarantine:
                await self._set(g, "quarantined", reason, "operator")
            elif lost and g.health != "lost":
                await self._set(g, "lost", reason, "reboot")
            elif recovery in ("reboot", "operator") and r.recovery == "reset":
                r.recovery = recovery
                await self._set(g, g.health, reason, recovery, force=True)
            return
        r.incidents = self.policy.recurring(r.incidents, now) + [now]
        r.migrated, r.reset_failures, r.reset_done, r.reset_asked, r.gone = set(), 0, 0.0, 0.0, False
        if quarantine or self.policy.quarantines(r.incidents, now):
            why = reason if quarantine else (
                f"{reason}: {len(r.incidents)} fatal incidents within {self.policy.window_seconds:g} s "
                f"(the policy allows {self.policy.max_recurrences} recurrences)")
            await self._set(g, "quarantined", why, "operator")
        else:
            await self._set(g, "lost" if lost else "unhealthy", reason, recovery)
        self._migrate_off(g, r)

    async def _recovered(self, g: GpuState, how: str) -> None:
        r = self.rec(g)
        r.reset_done, r.reset_failures, r.reset_asked, r.migrated, r.gone = 0.0, 0, 0.0, set(), False
        await self._set(g, "healthy", how, "")

    async def _set(self, g: GpuState, health: str, reason: str, recovery: str, force: bool = False) -> None:
        if g.health == health and not force and self.rec(g).recovery == recovery:
            return
        r = self.rec(g)
        now = self.tm.clock()
        old, g.health, r.recovery = g.health, health, recovery
        if old != health:
            HEALTH_CHANGES.labels(health).inc()
        stored = types_pb2.GpuTelemetry(index=g.index, health=HEALTH_ENUM[health],
                                        health_reason=reason if health != "healthy" else "",
                                        recovery=recovery, at=_ts(now))
        for t in r.incidents:
            stored.incidents.append(_ts(t))
        if g.telemetry is None:
            g.telemetry = types_pb2.GpuTelemetry(index=g.index)
        g.telemetry.health, g.telemetry.health_reason = stored.health, stored.health_reason
        # decided in memory already (a repeat of the same health returns early above): a write that fails is
        # retried at the GPU's next reading, so a restart never forgets a quarantine etcd was not given
        r.unsaved = stored
        await self._store(g, r)
        slices = [s for s in self.ctl.fleet.slices_on(g.node) if s.gpu_index == g.index]
        ids = ", ".join(s.id for s in slices) or "none"
        if health == "healthy":
            self.tm.record(g.node, "Normal", "GpuRecovered", f"GPU {g.index} back in service (was {old}): {reason}",
                           g.index, now)
            message = ""
        else:
            what = {"unhealthy": "GpuUnhealthy", "lost": "GpuLost", "quarantined": "GpuQuarantined"}[health]
            then = {"reset": "it will be reset once idle", "reboot": "it returns when the node brings it back clean",
                    "operator": "it stays out until an operator clears it (meshctl gpu clear)"}.get(recovery, "")
            self.tm.record(g.node, "Warning", what, f"GPU {g.index} {health}: {reason}; takes no new slices; "
                                                    f"{then}; slices on it: {ids}", g.index, now)
            message = f"GPU {health}: {reason}"
        priors = [s for s in slices if s.state != T.SLICE_STATE_RELEASING]
        changed = [self.ctl._update(s, message=message) for s in priors]
        if changed:
            await self.ctl.save_or_restore(changed, priors)

    async def _store(self, g: GpuState, r: GpuRecord) -> None:
        stored = r.unsaved
        await self.ctl.writer.write([Put(keys.gpu_health(g.node, g.index), stored.SerializeToString())])
        if r.unsaved is stored:
            r.unsaved = None

    # -- workloads ---------------------------------------------------------------------------------

    def _on_gpu(self, g: GpuState) -> set[str]:
        return {s.id for s in self.ctl.fleet.slices_on(g.node) if s.gpu_index == g.index}

    def _busy(self, g: GpuState) -> bool:
        """A workload runs (or starts) on the GPU, or a migration from or to it is under way."""
        sids = self._on_gpu(g)
        wm = _workloads(self.ctl)
        if wm is not None and any(w.slice_id in sids and w.state in ACTIVE_WORKLOAD for w in wm.workloads.values()):
            return True
        mm = getattr(self.ctl, "migrations", None)
        if mm is not None:
            from controlplane.controllers.migrations import FINISHED
            for m in mm.migrations.values():
                if m.phase not in FINISHED and (m.source_slice in sids or m.target_slice in sids):
                    return True
        return False

    def _migrate_off(self, g: GpuState, r: GpuRecord) -> None:
        mm = getattr(self.ctl, "migrations", None)
        if not self.policy.migrate or mm is None:
            return
        sids = self._on_gpu(g)
        for w in list(mm.wm.workloads.values()):
            if w.slice_id in sids and w.state == T.WORKLOAD_STATE_RUNNING and w.id not in r.migrated \
                    and mm.active_for(w.id) is None:
                r.migrated.add(w.id)
                task = asyncio.create_task(self._migrate(g, w.id), name=f"health-migrate-{w.id}")
                self.tasks.add(task)
                self.task_nodes[task] = g.node
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.task_nodes.pop(task, None)

    def forget_node(self, node: str) -> int:
        """A deleted node (controllers/nodedelete.py): the recovery of its GPUs ends. The tasks moving workloads
        off them are cancelled (the deletion ends those workloads and migrations itself; left running, a task
        tried the node itself next and recorded events on a node that no longer exists) and the GPUs' records
        (incidents, resets asked, failures) go. A task planning a migration (its record being written) ends, the
        planning does not (`_uncut`). Idempotent; the number of tasks cancelled."""
        for key in [k for k in self.gpus if k[0] == node]:
            del self.gpus[key]
        cancelled = [t for t, n in list(self.task_nodes.items()) if n == node and not t.done()]
        for task in cancelled:
            task.cancel()
        if cancelled:
            log(logger, logging.INFO, "health migrations of a deleted node's GPUs cancelled", node=node,
                tasks=len(cancelled))
        return len(cancelled)

    async def _migrate(self, g: GpuState, wid: str) -> None:
        """Move `wid` to a healthy GPU: first on another node (the migration manager's default
        placement, as drain does); when none can take it, to another GPU of the same node (the
        scheduler never places on a marked GPU)."""
        reason = g.telemetry.health_reason if g.telemetry is not None else g.health
        why = f"GPU {g.node}/{g.index} {g.health}: {reason}"
        mm = self.ctl.migrations
        for to_node in ("", g.node):
            try:
                m = await _uncut(mm.migrate(wid, to_node=to_node, reason=why))
            except errors.MeshError as e:
                MIGRATIONS.labels("refused").inc()
                self.tm.record(g.node, "Warning", "GpuWorkloadNotMoved",
                               f"GPU {g.index}: workload {wid} cannot be migrated off ({e}); it keeps running here",
                               g.index)
                return
            except Exception as e:  # noqa: BLE001 - a task: log, never lose it silently
                log(logger, logging.ERROR, "health migration failed", workload=wid, error=repr(e))
                return
            MIGRATIONS.labels("started").inc()
            where = f"on node {g.node}" if to_node else "on another node"
            self.tm.record(g.node, "Normal", "GpuWorkloadMigrating",
                           f"GPU {g.index} {g.health}: migrating workload {wid} to a healthy GPU {where} "
                           f"(migration {m.id})", g.index)
            task = getattr(mm, "tasks", {}).get(m.id)
            if task is None:
                return
            await asyncio.wait([task])
            done = mm.migrations.get(m.id, m)
            # No target found off the node (none was ever chosen): try this node's healthy GPUs.
            if to_node or done.phase != M.MIGRATION_PHASE_ABORTED or done.target_slice:
                if done.phase == M.MIGRATION_PHASE_ABORTED:
                    self.tm.record(g.node, "Warning", "GpuWorkloadNotMoved",
                                   f"GPU {g.index}: migration {m.id} of workload {wid} aborted ({done.message}); "
                                   f"it keeps running here", g.index)
                return


async def _uncut(planning):
    """Await `planning` (MigrationManager.migrate) to its end even when the caller is cancelled (forget_node): it
    writes the migration's record and only then adopts and starts it, so a cancel in between left a record in
    etcd that this leader neither knew nor drove. Cancelled, the caller ends at once; the migration, if it was
    written, runs its course (its steps on a deleted node fail at once and it rolls back)."""
    inner = asyncio.ensure_future(planning)
    inner.add_done_callback(lambda t: t.cancelled() or t.exception())     # (retrieved: the caller may be gone)
    return await asyncio.shield(inner)


def _workloads(ctl):
    mm = getattr(ctl, "migrations", None)
    return mm.wm if mm is not None else None


def _ts(seconds: float):
    from google.protobuf import timestamp_pb2
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
