"""Migrations, checkpoints and restores: the state machine, kept in etcd.

A migration moves a running workload (same workload ID) from its slice to another one, on
another node or the same one (there the target process runs under an alias of the workload's
ID until the source is stopped). A resize by migration (controlplane/controllers/resize.py) is one whose
target is a slice of the new size; at its commit the two slices swap placements so the
client's slice ID names the new one. Its record, `/gpumesh/v1/migrations/<id>`, holds the
phase:

    PLANNED -> TARGET_READY -> COPYING -> PAUSED -> COMMITTED -> DONE
         \\__________\\____________\\_________\\-> ROLLING_BACK -> ABORTED

* PLANNED: recorded; the target slice is chosen (or allocated, labelled with the
  migration's ID so a rollback finds it even if the control plane died in between).
* TARGET_READY: the target agent started the workload in receive mode
  (`GPUMESH_RESTORE_FROM=receive:...`, `GPUMESH_RESTORE_HOLD=1`); it listens.
* COPYING: the source agent pre-copies while the workload trains (or, for a restore from
  the store, the target agent pushes the checkpoint).
* PAUSED: the source is paused at a safe point; the final delta is sent and committed on
  the target, which restores and then *holds* (does not train).
* COMMITTED: the commit point. One etcd transaction writes the phase and moves the
  workload record to the target node and slice. Only then is the target told to run
  (RESUME_TARGET) and the source told to stop (STOP_SOURCE); the source is paused at that
  moment, so there are never two copies making progress, and never none: before the
  commit the source is the workload (it resumes on rollback), after it the target is.
* DONE: the target runs, the source stopped.

Recovery when the control plane starts (any phase, any crash): a migration before
COMMITTED is rolled back (ROLLING_BACK: stop the target process, release a slice the
migration allocated, resume the source, then ABORTED); a COMMITTED one is finished (stop
the source, resume the target, DONE). Every agent step is idempotent and is repeated until
answered, so a step cut by a crash or a reconnect is simply asked again.

Only a durable phase is acted on: a phase change is built on a copy and adopted once etcd took it
(`_set`, `_adopt`); a commit write that fails unapplied is tried again with the source paused (a
refused one rolls back), so the target never runs on a commit etcd does not hold. A rollback stays
ROLLING_BACK until the source's agent confirms the source resumed (re-sent on its next session).

Checkpoints: `Checkpoint` asks the workload's agent to write a consistent checkpoint into
the store (agents' `checkpoint_dir`, encrypted per tenant when keys are configured); the
record is `/gpumesh/v1/checkpoints/<id>`. `Restore` is a migration without a source: the
target agent pushes the stored checkpoint into the receiving target, and the rest is the
same state machine.

Transparent mode (CRIU, for processes without the SDK) takes the same phases, stop-and-copy:
the source agent dumps the process at PAUSED (it is gone there), the target restores it held
stopped, COMMITTED moves the record, DONE continues it; a rollback restores the source from its
images (nodeagent/migrate_slices.py, docs/checkpointing.md). Only to another node.

Modules: migration_phases (names, timeouts), migration_steps (the steps of the state machine),
migration_targets (a named target slice, node or GPU), migration_checkpoints (checkpoint, restore), resize
(resize in place or by migration).

`migration_pause_at` (testing only) stops the state machine right after it entered a
phase, so a test can kill the control plane there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from controlplane.state import keys
from controlplane.controllers import backendshare
from controlplane.controllers.slices import Controller, new_id, now
from controlplane.controllers.migration_checkpoints import CheckpointsMixin
from controlplane.controllers.migration_nodes import NodesMixin
from controlplane.controllers.copy_wait import StepWait
from controlplane.controllers.migration_phases import (BEFORE_COMMIT, FINISHED, PHASE_NAMES, RESEND, STEP_TIMEOUT,
                                                       TARGET_WANTED, C, P, R, StepFailed, StepTimedOut, W, alias,
                                                       phase_name)
from controlplane.controllers.migration_records import check_mode, check_workload_id, target_spec
from controlplane.controllers.migration_steps import StepsMixin
from controlplane.controllers.resize import ResizeMixin
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
_Failed = StepFailed
# the steps whose answer needs the migration's other node: the target listens for the source's data, the source
# sends it to the target (a restore's target reads the checkpoint store: PUSH_CHECKPOINT is not one)
TRANSFER_STEPS = (C.START_TARGET, C.SEND)
__all__ = ["FINISHED", "MigrationManager", "phase_name"]


class MigrationManager(StepsMixin, CheckpointsMixin, ResizeMixin, NodesMixin):
    def __init__(self, ctl: Controller, workloads, pause_at: str = "") -> None:
        self.ctl = ctl
        self.wm = workloads
        self.pause_at = PHASE_NAMES.get(pause_at.lower()) if pause_at else None
        if pause_at and self.pause_at is None:
            raise ValueError(f"migration_pause_at: {pause_at!r} (allowed: {', '.join(PHASE_NAMES)})")
        self.migrations: dict[str, M.Migration] = {}
        self.checkpoints: dict[str, M.CheckpointInfo] = {}
        self.checkpoint_keys: dict[str, bytes] = {}
        """checkpoint id -> its own key (etcd: keys.CHECKPOINT_KEYS; never in a CheckpointInfo)."""
        self.secrets: dict[str, bytes] = {}
        """migration id -> transfer secret (etcd: keys.MIGRATION_SECRETS; never in a Migration record)."""
        self.reports: dict[str, dict[str, asyncio.Queue]] = {}     # migration id -> node -> reports
        self.tasks: dict[str, asyncio.Task] = {}
        self.watchers: dict[str, list[asyncio.Queue]] = {}
        self._phases_emitted: dict[str, int] = {}                  # migration id -> phase of its last event
        # migration id -> a new migration whose first write is awaited: unfinished already for `unfinished()`
        self.planning: dict[str, M.Migration] = {}
        self.reserving: dict[str, asyncio.Future] = {}    # id -> a resize's `_reserve`: the writer until `_spawn`
        self.commit_unsure: set[str] = set()    # commits written without a verdict (migration_steps._write_commit)
        self.releasing_old: set[str] = set()    # resizes' old placements they release now (resize.py)
        self.agents_swapped: set[str] = set()   # resizes whose agents answered SWAP_SLICES here (resize.py)
        ctl.agent_handlers["migration"] = self._on_report
        ctl.release_hooks.insert(0, self._refuse_old_placement)     # before a hook stops anything
        if hasattr(ctl, "removal_holds"):
            ctl.removal_holds.append(self._removal_held)
        self.attach_quota(getattr(ctl, "fleet", None))     # a move's target counts once with its source
        workloads.extra_desired.append(self.targets_on)
        workloads.run_guards.append(self.target_busy)
        ctl.migrations = self

    # -- start and stop -------------------------------------------------------------------

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.MIGRATIONS)
        for value, _rev, _lease in snap.kvs.values():
            m = M.Migration()
            m.ParseFromString(value)
            self.migrations[m.id] = m
        snap = await self.ctl.store.load(keys.MIGRATION_SECRETS)
        for key, (value, _rev, _lease) in snap.kvs.items():
            self.secrets[(key.decode() if isinstance(key, bytes) else key)[len(keys.MIGRATION_SECRETS):]] = value
        snap = await self.ctl.store.load(keys.CHECKPOINT_KEYS)
        for key, (value, _rev, _lease) in snap.kvs.items():
            self.checkpoint_keys[(key.decode() if isinstance(key, bytes) else key)[len(keys.CHECKPOINT_KEYS):]] = value
        snap = await self.ctl.store.load(keys.CHECKPOINTS)
        for value, _rev, _lease in snap.kvs.values():
            ck = M.CheckpointInfo()
            ck.ParseFromString(value)
            self.checkpoints[ck.id] = ck
        unfinished = [m for m in self.migrations.values() if m.phase not in FINISHED]
        for m in unfinished:
            if m.phase in BEFORE_COMMIT:
                # The target never ran (it holds until the commit): roll back. Persisted before any
                # agent reconnects, so the target's node is no longer asked to keep the target process.
                await self._set(m, P.MIGRATION_PHASE_ROLLING_BACK,
                                message=f"control plane restarted in phase {phase_name(m.phase)}: rolling back")
            log(logger, logging.INFO, "recovering migration", migration=m.id, workload=m.workload_id,
                phase=phase_name(m.phase))
            self._spawn(m.id)

    async def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()

    def _spawn(self, mid: str) -> None:
        """Start migration `mid`'s state machine, the one writer of its record, unless it runs already."""
        running = self.tasks.get(mid)
        if running is not None and not running.done():
            return
        self.reports.setdefault(mid, {})
        self.tasks[mid] = asyncio.create_task(self._drive(mid), name=f"migration-{mid}")

    # -- persistence ------------------------------------------------------------------------

    async def _save(self, m: M.Migration, ops: list = (), conds: list = (), created: bool = False) -> int:
        m.updated_at.CopyFrom(now())
        ops = list(ops)
        if m.phase in FINISHED and m.id in self.secrets:
            ops.append(Delete(keys.migration_secret(m.id)))     # the transfer is over: its secret goes
        rev = await self.ctl.writer.write([Put(keys.migration(m.id), m.SerializeToString()), *ops],
                                          [Absent(keys.migration(m.id)) if created else Present(keys.migration(m.id)),
                                           *conds])
        if m.phase in FINISHED:
            self.secrets.pop(m.id, None)
        self._phase_event(m)
        self.migrations[m.id] = m
        for q in self.watchers.get(m.id, ()):
            q.put_nowait(M.Migration.FromString(m.SerializeToString()))
        return rev

    def _phase_event(self, m: M.Migration) -> None:
        """A durable event for each phase a migration enters (controlplane/events/)."""
        emitted = self._phases_emitted
        if emitted.get(m.id) == m.phase:
            return
        emitted[m.id] = m.phase
        if m.phase in FINISHED:
            from controlplane.api.metrics import MIGRATIONS_FINISHED
            MIGRATIONS_FINISHED.labels("done" if m.phase == P.MIGRATION_PHASE_DONE else "aborted").inc()
        name = phase_name(m.phase)
        warn = m.phase in (P.MIGRATION_PHASE_ABORTED, P.MIGRATION_PHASE_ROLLING_BACK)
        text = f"workload {m.workload_id} {m.source_node} -> {m.target_node or '?'}: {name}"
        self.ctl.recorder.emit("Migration", m.id, "Warning" if warn else "Normal",
                               "Migration" + "".join(w.capitalize() for w in name.split("_")),
                               text + (f" ({m.message})" if m.message else ""), tenant=m.tenant,
                               node=m.source_node, source="migration-controller")

    async def _set(self, m: M.Migration, phase: int, **fields) -> None:
        """Move `m` to `phase` once etcd holds it: the new record is built on a copy and adopted only after
        the write succeeded, so a failed write leaves `m` in the phase etcd still says (never acted on)."""
        n = M.Migration()
        n.CopyFrom(m)
        n.phase = phase
        for k, v in fields.items():
            setattr(n, k, v)
        await self._adopt(m, n)
        log(logger, logging.INFO, "migration phase", migration=m.id, workload=m.workload_id,
            phase=phase_name(phase), message=m.message)

    async def _adopt(self, m: M.Migration, n: M.Migration, ops: list = (), conds: list = (),
                     swapped: bool = False) -> int:
        """Write `n` (the next state of `m`, with `ops` in the same transaction; `swapped`: a resize's commit,
        with both slice records) and only then make `m` it (the write's revision). A failed write leaves `m`."""
        rev = await (self._save_swapped(n, list(ops), list(conds)) if swapped else self._save(n, ops, conds))
        m.CopyFrom(n)
        self.migrations[m.id] = m
        return rev

    async def _until_written(self, what: str, m: M.Migration, write) -> None:
        """Repeat `write()` (a phase change that must not be skipped, e.g. into ROLLING_BACK) until etcd takes
        it: an etcd member restarting or a lost quorum fails a write without applying it. Leadership lost
        cancels the task (`stop`); the next leader recovers from what etcd holds."""
        while True:
            try:
                return await write()
            except errors.MeshError as e:
                log(logger, logging.WARNING, "migration record not written; retrying", migration=m.id,
                    what=what, error=str(e))
                await asyncio.sleep(RESEND)

    async def _pause_hook(self, m: M.Migration) -> None:
        if self.pause_at is not None and m.phase == self.pause_at:
            log(logger, logging.WARNING, "migration paused here (migration_pause_at)", migration=m.id,
                phase=phase_name(m.phase))
            await asyncio.Event().wait()

    # -- the agents ---------------------------------------------------------------------------

    async def _on_report(self, node: str, rep: M.MigrationReport) -> None:
        qs = self.reports.get(rep.migration_id)
        if qs is not None:
            qs.setdefault(node, asyncio.Queue()).put_nowait(rep)

    def _send(self, node: str, cmd: M.MigrationCommand) -> bool:
        session = self.ctl.sessions.get(node)
        if session is None:
            return False
        session.send(node_service_pb2.ControllerMessage(migration=cmd))
        return True

    async def _ask(self, mid: str, node: str, cmd: M.MigrationCommand, want: tuple, timeout: float,
                   on_other=None, resend: float = RESEND, failures: bool = True,
                   idle: float | None = None) -> M.MigrationReport:
        """Send `cmd` to `node` (again every `resend` seconds) until it answers with an event in `want` within
        `timeout` (with `idle`: also progress every `idle` seconds, copy_wait.py), else StepTimedOut. A FAILED
        answer raises, unless `failures` is false (rollback steps: repeat until done)."""
        loop = asyncio.get_running_loop()
        q = self.reports.setdefault(mid, {}).setdefault(node, asyncio.Queue())
        next_send = 0.0
        what = C.Action.Name(cmd.action).lower()
        wait = StepWait(node, what, timeout, loop.time(), idle)
        while True:
            t = loop.time()
            gone = self._deleted_node(mid, node, cmd.action)
            if gone:
                raise _Failed(f"node {gone} was deleted ({what} not answered)")
            why = wait.expired(t)
            if why:
                raise StepTimedOut(why)
            if t >= next_send:
                self._send(node, cmd)
                next_send = t + resend
            try:
                async with asyncio.timeout(max(0.01, min(next_send, wait.deadline) - t)):   # not wait_for (gh-86296)
                    rep = await q.get()
            except TimeoutError:
                continue
            if rep.event == R.FAILED and failures:
                raise _Failed(rep.message or f"{what} failed on {node}")
            if rep.event in want:
                return rep
            wait.note(rep, loop.time())
            if on_other is not None:
                await on_other(rep)

    def _deleted_node(self, mid: str, node: str, action: int = 0) -> str:
        """The deleted node (controllers/nodedelete.py) that makes the step `action` asked of `node` hopeless, or
        "": the node itself; before the commit also the peer of a step that moves data between the two
        (TRANSFER_STEPS: the target receives from the source, the source sends to the target), so such a step
        fails and the migration rolls back. A restore's data comes from the checkpoint store, not from its
        source (the node the workload last ran on, perhaps deleted since), so its source is never checked.
        Rollback and finish steps to a live node go on."""
        deleted = getattr(self.ctl, "deleted_nodes", None)
        nodes = getattr(getattr(self.ctl, "fleet", None), "nodes", None)

        def gone(n: str) -> bool:
            # being deleted, or deleted already (no record: a migration names only nodes that existed)
            return bool(n) and ((deleted is not None and n in deleted) or (nodes is not None and n not in nodes))
        if gone(node):
            return node
        m = self.migrations.get(mid)
        if m is None or m.phase not in BEFORE_COMMIT or m.checkpoint_id or action not in TRANSFER_STEPS:
            return ""
        peer = m.target_node if node == m.source_node else m.source_node
        return peer if gone(peer) else ""

    # -- the API --------------------------------------------------------------------------------

    def get(self, mid: str) -> M.Migration:
        m = self.migrations.get(mid)
        if m is None:
            raise errors.NotFound(f"no migration {mid!r}", kind="migration", name=mid)
        return m

    def unfinished(self):
        """The migrations not finished, those being planned (first write awaited) included."""
        yield from self.planning.values()
        yield from (m for m in self.migrations.values() if m.phase not in FINISHED)

    @contextlib.contextmanager
    def _planned(self, m: M.Migration):
        """`m` counts as unfinished from its checks until its record is written (then `migrations` holds it): a
        second Migrate, Restore or resize of the same workload or slice, asked while the first write awaits,
        is refused instead of planning a second migration of it."""
        self.planning[m.id] = m
        try:
            yield m
        finally:
            self.planning.pop(m.id, None)
            if m.id not in self.migrations:
                self.target_gpus.pop(m.id, None)       # never recorded: its pin goes with it

    def target_busy(self, sid: str) -> str:
        """Why slice `sid` takes no new workload now: it is an unfinished migration's target (a workload started there
        would be stopped with the slice if the migration rolls back, or share it with the migrated one if it
        commits), or a slice being resized (one started on the old placement would be torn down with it)."""
        for m in self.unfinished():
            if sid == m.target_slice and sid != m.resize_slice:
                return f"is the target of migration {m.id} ({phase_name(m.phase)}); run on it after it ends"
            if sid == m.resize_slice:
                return f"is being resized (migration {m.id}, {phase_name(m.phase)}); run on it after the resize ends"
        return ""

    def active_for(self, wid: str) -> M.Migration | None:
        return next((m for m in self.unfinished() if m.workload_id == wid), None)

    def targets_on(self, node: str) -> list[types_pb2.Workload]:
        """Workloads the target node must keep (the receiving target processes), for the workload
        manager's full command to an agent that reconnects mid-migration. A same-node target runs
        under its alias until the source hands the ID over after the commit, so it is kept through
        COMMITTED too (once handed over, the agent knows no alias and ignores the entry). A target on another
        node is kept through COMMITTED until the workload's record names that node (from then on the record
        itself keeps it), so no moment of the commit leaves it out of the node's full command."""
        out = []
        for m in self.migrations.values():
            w = self.wm.workloads.get(m.workload_id)
            wanted = m.phase in TARGET_WANTED or (m.phase == P.MIGRATION_PHASE_COMMITTED and w is not None and (
                alias(m) or w.node != m.target_node))
            if wanted and m.target_node == node and w is not None:
                t = self._target_spec(m, self.wm.workloads[m.workload_id])
                t.started_at.CopyFrom(m.created_at)    # keep it if it runs; never start it from this command
                out.append(t)
        return out

    def _target_spec(self, m: M.Migration, w: types_pb2.Workload) -> types_pb2.Workload:
        """The workload as the target agent starts it: the record as it is (tenant, command, env, labels,
        the model server's `backend` with its replica key and pinned artifact, its `endpoint`, created_at)
        on the target's node and slice, under the same-node alias if any, PENDING, without what belongs to
        the source's process (pid, exit code, start and end times, message) and without the restore
        variables of an earlier restore. A transparent target is restored with the same command and
        listening socket, so it keeps `endpoint`; any other target is started anew and its agent picks a
        new port (nodeagent/backends/) and reports it (migration_records.py)."""
        t = target_spec(w, alias(m) or w.id, m.target_slice, m.target_node)
        if w.slice_id == m.source_slice:    # a hand-started vLLM: the target slice's share (backendshare.py)
            backendshare.moved(self.ctl.fleet, t, w.slice_id, m.target_slice)
        return t

    async def migrate(self, wid: str, to_node: str = "", to_slice: str = "", mode: int = 0,
                      reason: str = "migrate", to_gpu: int = -1) -> M.Migration:
        """Plan the migration of running workload `wid` and start its state machine. `to_gpu` (internal, no API
        field: `meshctl recommend --apply`'s pack) pins the target to that GPU of `to_node` (migration_targets.py)."""
        check_workload_id(wid)
        w = self.wm.get(wid)
        if w.state != W.WORKLOAD_STATE_RUNNING:
            raise errors.FailedPrecondition(f"workload {wid} is {W.WorkloadState.Name(w.state)}: only a RUNNING "
                                            f"workload migrates (restore a stopped one from a checkpoint)")
        busy = self.active_for(wid)
        if busy is not None:
            raise errors.FailedPrecondition(f"workload {wid} is migrating already ({busy.id}, "
                                            f"{phase_name(busy.phase)})")
        check_mode(w, mode or M.MIGRATION_MODE_PRECOPY)
        m = M.Migration(id=new_id("m"), workload_id=wid, tenant=w.tenant, mode=mode or M.MIGRATION_MODE_PRECOPY,
                        phase=P.MIGRATION_PHASE_PLANNED, source_node=w.node, source_slice=w.slice_id,
                        reason=reason, created_at=now())
        with self._planned(m):
            if mode == M.MIGRATION_MODE_TRANSPARENT:
                await self._check_transparent(w)
            else:
                await self.check_sdk(w, f"{M.MigrationMode.Name(m.mode).removeprefix('MIGRATION_MODE_').lower()} "
                                        f"migration")
            self._set_target(m, to_slice, to_node, to_gpu, w)
            if mode == M.MIGRATION_MODE_TRANSPARENT and m.target_node == w.node:
                raise errors.FailedPrecondition(f"transparent migration of {wid} must go to another node: CRIU "
                                                f"restores the process under its PIDs, which the source holds on "
                                                f"{w.node}")
            await self._save(m, created=True)
        log(logger, logging.INFO, "migration planned", migration=m.id, workload=wid, source=w.node,
            to_node=to_node, to_slice=to_slice, to_gpu=to_gpu if to_gpu >= 0 else None, reason=reason)
        self._spawn(m.id)
        return m

    async def _check_transparent(self, w: types_pb2.Workload) -> None:
        """The source agent says whether it can dump the process with CRIU (else FAILED_PRECONDITION
        with its reason: criu missing or too old, `criu check` failing)."""
        await self._probe(w, C.CHECK_TRANSPARENT, R.TRANSPARENT_OK, "transparent migration")

    async def check_sdk(self, w: types_pb2.Workload, what: str = "migration") -> None:
        """The source agent says whether the workload's checkpoint SDK answers (what pre-copy and stop-and-copy
        need), else FAILED_PRECONDITION with its reason. Without it the migration started the target, which
        never listened, and rolled back after the step timeout (90 s of a CLI waiting for nothing). An agent
        of an earlier release, which does not know the probe, is taken at its word later, as before."""
        if w.HasField("backend"):
            return              # check_mode refuses a model server anything but transparent
        try:
            await self._probe(w, C.CHECK_SDK, R.SDK_OK, what)
        except errors.FailedPrecondition as e:
            if "unknown migration action" not in str(e):
                raise
            log(logger, logging.INFO, "the source agent cannot tell whether the workload uses the checkpoint SDK "
                "(an earlier release): the migration goes ahead", workload=w.id, node=w.node)

    async def _probe(self, w: types_pb2.Workload, action: int, ok: int, what: str) -> None:
        if self.ctl.sessions.get(w.node) is None:
            raise errors.Unavailable(f"node {w.node} is not connected")
        probe = new_id("probe")
        try:
            await self._ask(probe, w.node, M.MigrationCommand(migration_id=probe, action=action, workload_id=w.id),
                            (ok,), STEP_TIMEOUT)
        except StepFailed as e:
            raise errors.FailedPrecondition(f"{what} of {w.id} refused: {e}") from None
        finally:
            self.reports.pop(probe, None)
