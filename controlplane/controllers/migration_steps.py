"""The migration state machine's steps (the MigrationManager's part for them): plan (place the
target, start it in receive mode), copy (pre-copy from the source, or push a checkpoint), commit
(one etcd transaction), finish (target runs, source stops), roll back. See
controlplane/controllers/migrations.py for the phases and the recovery rules.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from controlplane.state import keys
from controlplane.controllers.copy_wait import Idle
from controlplane.controllers.migration_phases import (BEFORE_COMMIT, COPY_IDLE_TIMEOUT, COPY_TIMEOUT, FINISHED, LABEL,
                                                       PLACE_ATTEMPTS, RESEND, ROUND_IDLE_TIMEOUT, START_TIMEOUT,
                                                       STEP_TIMEOUT, C, P, R, StepFailed, W, alias, phase_name)
from controlplane.controllers.migration_quota import QuotaMixin, off_node
from controlplane.controllers import backendshare
from controlplane.controllers.migration_records import committed_record
from controlplane.controllers.migration_targets import TargetsMixin
from controlplane.controllers.workloadrecords import UPDATE_TRIES as COMMIT_CONFLICTS
from controlplane.state.store import Put, Revision
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.migrations")
_Failed = StepFailed


class StepsMixin(QuotaMixin, TargetsMixin):
    """Mixed into MigrationManager (self.ctl, self.wm, self.migrations, self._ask, self._save, ...)."""

    # the long steps' wait (controllers/copy_wait.py): the leader sets them from its configuration
    copy_idle_timeout: float = COPY_IDLE_TIMEOUT
    copy_timeout: float = COPY_TIMEOUT

    # -- the state machine ----------------------------------------------------------------------

    async def _drive(self, mid: str) -> None:
        m = self.migrations[mid]
        steps = {P.MIGRATION_PHASE_PLANNED: self._plan, P.MIGRATION_PHASE_TARGET_READY: self._copy,
                 P.MIGRATION_PHASE_COPYING: self._copy, P.MIGRATION_PHASE_PAUSED: self._copy,
                 P.MIGRATION_PHASE_COMMITTED: self._finish, P.MIGRATION_PHASE_ROLLING_BACK: self._rollback}
        try:
            while m.phase not in FINISHED:
                before = m.phase
                try:
                    await steps[m.phase](m)
                except Exception as e:  # noqa: BLE001 - a step's failure, or a bug in it: handled alike
                    if not isinstance(e, (_Failed, errors.MeshError)):
                        # ended here, the task left the migration in its phase (the source perhaps paused)
                        # until the next leader's start: roll back before the commit, retry after it
                        logger.exception("migration %s: unexpected error in phase %s", mid, phase_name(m.phase))
                    if m.phase in BEFORE_COMMIT:
                        await self._until_written("rolling back", m, lambda e=e: self._set(
                            m, P.MIGRATION_PHASE_ROLLING_BACK, message=f"rolling back: {e}"))
                    elif m.phase == before:
                        log(logger, logging.WARNING, "migration step failed; retrying", migration=m.id,
                            phase=phase_name(m.phase), error=str(e))
                        await asyncio.sleep(RESEND)
        except asyncio.CancelledError:
            raise
        except Exception:   # noqa: BLE001 - a bug here must not take the control plane down
            logger.exception("migration %s", mid)
        finally:
            self.tasks.pop(mid, None)
            if m.phase in FINISHED:
                self.reports.pop(mid, None)
                for q in self.watchers.get(mid, ()):
                    q.put_nowait(None)

    async def _place(self, m: M.Migration, w: types_pb2.Workload) -> types_pb2.Slice:
        """A slice of the workload's slice's spec, on `m.target_node` if set, else off the source node;
        labelled with the migration's ID. Placements the scheduler makes elsewhere are held while it is
        asked again (so it picks another node), then released."""
        src = self.ctl.fleet.slices.get(w.slice_id)
        if src is None:
            raise _Failed(f"the workload's slice {w.slice_id} is gone: name a target slice")
        req = self.target_request(src, m.id, replaces=not m.checkpoint_id)     # counts once with src (migration_quota)
        req = self.pinned_request(m, req)       # to the one GPU it was pinned to, if any (migration_targets.py)
        if not (m.target_node or m.checkpoint_id or m.resize_slice):
            # off the source node: the scheduler is told so (a packing score put every probe back on a source
            # node with room, and after PLACE_ATTEMPTS probes the migration failed with the fleet half empty)
            req = off_node(req, m.source_node)
        held = []
        try:
            for _ in range(PLACE_ATTEMPTS):
                alloc_id, slices = await self.ctl.allocate(req, no_wait=True)
                s = slices[0]
                if s.node == m.target_node if m.target_node else (
                        m.checkpoint_id or m.resize_slice or s.node != m.source_node):
                    m.target_slice, m.target_node, m.target_allocated = s.id, s.node, True
                    await self._save(m)
                    ready = await self.ctl._await_ready(alloc_id, False, 0)
                    return ready[0]
                held.append(alloc_id)
            raise _Failed(f"no slice like {src.id} could be placed "
                          f"{'on node ' + m.target_node if m.target_node else 'off node ' + m.source_node}")
        finally:
            for alloc_id in held:
                try:
                    await self.ctl.release(alloc_id, wait=False, message=f"placement probe of migration {m.id}")
                except errors.MeshError:
                    pass

    async def _plan(self, m: M.Migration) -> None:
        await self._pause_hook(m)
        if m.resize_slice and not m.workload_id:
            return await self._commit_idle_resize(m)
        w = self.wm.workloads.get(m.workload_id)
        if w is None:
            raise _Failed(f"workload {m.workload_id} is gone")
        if not m.target_slice:
            await self._place(m, w)
        s = self.ctl.fleet.slices.get(m.target_slice)
        if s is None or s.state != types_pb2.SLICE_STATE_READY:
            raise _Failed(f"target slice {m.target_slice} is not READY")
        if not m.session or m.id not in self.secrets:
            # The session names the transfer (not secret); the secret (>= 128 random bits) is kept under its
            # own key, which only the control plane reads, and goes only to the two agents in their commands.
            secret = secrets.token_bytes(32)
            m.session = m.session or f"mig-{m.id}"
            await self._save(m, [Put(keys.migration_secret(m.id), secret)])
            self.secrets[m.id] = secret
        rep = await self._ask(m.id, m.target_node, M.MigrationCommand(
            migration_id=m.id, action=C.START_TARGET, workload_id=m.workload_id, workload=self._target_spec(m, w),
            session=m.session, mode=m.mode, alias=alias(m), secret=self.secrets[m.id], peer=m.source_node),
            (R.TARGET_LISTENING,), START_TIMEOUT)
        await self._set(m, P.MIGRATION_PHASE_TARGET_READY, target_address=rep.address)
        await self._pause_hook(m)

    async def _copy(self, m: M.Migration) -> None:
        if m.phase == P.MIGRATION_PHASE_TARGET_READY:
            await self._set(m, P.MIGRATION_PHASE_COPYING)
        if m.checkpoint_id:
            ck = self.checkpoints.get(m.checkpoint_id)
            if ck is None:
                raise _Failed(f"checkpoint {m.checkpoint_id} is gone")
            node, cmd = m.target_node, M.MigrationCommand(
                migration_id=m.id, action=C.PUSH_CHECKPOINT, workload_id=m.workload_id, session=m.session,
                path=ck.path, tenant=m.tenant, secret=self._secret(m),
                checkpoint_key=self.checkpoint_keys.get(m.checkpoint_id, b""))
        else:
            node, cmd = m.source_node, M.MigrationCommand(
                migration_id=m.id, action=C.SEND, workload_id=m.workload_id, session=m.session,
                address=m.target_address, mode=m.mode, secret=self._secret(m), peer=m.target_node)
        self._send(node, cmd)
        await self._pause_hook(m)

        async def progress(rep: M.MigrationReport) -> None:
            if rep.event == R.PROGRESS and rep.HasField("round"):
                if rep.transfer:
                    m.transfer = rep.transfer
                m.rounds.append(rep.round)
                m.round, m.bytes_sent, m.mb_per_s = rep.round.round, rep.bytes, rep.mb_per_s
                await self._save(m)
            elif rep.event == R.PROGRESS and rep.bytes > m.bytes_sent:
                # a restore's push, answered to each repeat of PUSH_CHECKPOINT: the bytes pushed so far
                m.bytes_sent = rep.bytes
                await self._save(m)
            elif rep.event == R.SOURCE_PAUSED and m.phase == P.MIGRATION_PHASE_COPYING:
                await self._set(m, P.MIGRATION_PHASE_PAUSED, step=rep.step)
                await self._pause_hook(m)
        idle = self.copy_idle_timeout
        if not m.checkpoint_id and idle < ROUND_IDLE_TIMEOUT:
            idle = Idle(ROUND_IDLE_TIMEOUT, f"a pre-copy round's, copy_idle_timeout_seconds being {idle:g} s")
        rep = await self._ask(m.id, node, cmd, (R.RESTORED,), self.copy_timeout, on_other=progress, idle=idle)
        await self._commit(m, rep)

    def _secret(self, m: M.Migration) -> bytes:
        secret = self.secrets.get(m.id)
        if secret is None:
            raise _Failed(f"migration {m.id} has no transfer secret (lost from etcd?): rolling back")
        return secret

    async def _commit(self, m: M.Migration, rep: M.MigrationReport) -> None:
        """The commit point: one transaction writes the migration COMMITTED and the workload's record on the
        target. The new migration record is built on a copy and adopted (and the in-memory workload record
        moved) only once etcd took the write, so nothing acts on a commit that is not durable. A write that
        fails without a verdict (an etcd member restarting, quorum lost) is tried again while the source
        stays paused and the target holds; only a refused precondition (nothing written) rolls back.

        The workload's record is written on the condition that etcd still holds the one it was computed from (its
        mod revision): a write that went first (the source's status report) is read back and the commit computed
        again from it, and a late write computed from the record before the commit fails in its turn
        (workloadrecords.py), so nothing puts the record back on the source."""
        conflicts = 0
        run_conds = self._no_run_starting(m)        # a resize: Runs on its slice that passed their guards before it
        while True:
            w = self.wm.workloads.get(m.workload_id)
            if w is None:
                raise _Failed(f"workload {m.workload_id} is gone")
            if m.checkpoint_id is None or not m.checkpoint_id:
                if w.node != m.source_node or w.state != W.WORKLOAD_STATE_RUNNING:
                    raise _Failed(f"the source changed while copying ({W.WorkloadState.Name(w.state)} on {w.node})")
            if w.id in self.wm.stopping:
                # a Stop acknowledged meanwhile: committed, the target was resumed and the Stop lost (the commit's
                # record is RUNNING on the target, and the source's end is a node's that no longer holds it)
                raise _Failed(f"workload {w.id} is being stopped (Stop): not moved")
            # a target slice released meanwhile (its client's Release, answered OK; a preemption) is torn down with
            # the target in it: committed there, the source was stopped and the workload ran nowhere
            t = self.ctl.fleet.slices.get(m.target_slice)
            if t is None or t.state != types_pb2.SLICE_STATE_READY:
                raise _Failed(f"the target slice {m.target_slice} was released while copying ("
                              f"{'gone' if t is None else types_pb2.SliceState.Name(t.state)})")
            n = committed_record(w, m, rep.step)        # everything still true kept (migration_records.py)
            backendshare.moved(self.ctl.fleet, n, w.slice_id, m.target_slice)     # a vLLM: the target's share
            c = M.Migration()
            c.CopyFrom(m)
            c.phase = P.MIGRATION_PHASE_COMMITTED
            c.step, c.downtime_ms, c.total_ms = rep.step, rep.downtime_ms, rep.total_ms
            c.bytes_sent = max(c.bytes_sent, rep.bytes)
            if rep.state_bytes:
                c.state_bytes = rep.state_bytes
            if rep.mb_per_s:
                c.mb_per_s = rep.mb_per_s
            if rep.transfer:
                c.transfer = rep.transfer
            c.message = ""
            base = self.wm.revisions.get(n.id, 0)
            ops = [Put(keys.workload(n.id), n.SerializeToString())]
            conds = [Revision(keys.workload(n.id), base), *run_conds]
            rev = await self._write_commit(m, c, ops, conds, workload=(n.id, base))
            if rev is not None:
                break
            if base != self.wm.revisions.get(n.id, 0):
                conflicts += 1
                if conflicts >= COMMIT_CONFLICTS:
                    raise _Failed(f"the workload's record kept changing during the commit ({conflicts} times)")
        # adopted together with the phase (no await in between): the target node's full command names the
        # target through the whole commit (targets_on before, the record after); a newer record read back
        # meanwhile (another write's conflict, computed from this one) stays
        if (rev or 0) >= self.wm.revisions.get(n.id, 0):
            self.wm.workloads[n.id] = n
            self.wm.revisions[n.id] = rev or 0
        for fut in self.wm.waiters.pop(n.id, []):
            if not fut.done():
                fut.set_result(n)
        log(logger, logging.INFO, "migration committed", migration=m.id, workload=m.workload_id,
            target=m.target_node, step=m.step, downtime_ms=round(m.downtime_ms, 1))
        await self._pause_hook(m)

    async def _write_commit(self, m: M.Migration, c: M.Migration, ops: list, conds: list,
                            workload: tuple[str, int] | None = None) -> int | None:
        """Write the commit `c` of `m` (adopted on success: the write's revision). A refused precondition
        (errors.Aborted: nothing was written) fails the step, so it rolls back, unless it was the workload's
        record (`workload`: its id and the mod revision the commit was computed from) that another write
        changed meanwhile: that record is read back and None answered at once, for the caller to compute the
        commit again. Any other failure is logged and answers None after a pause, for the caller to try again
        with what is then current. Such a failure may have landed after all (the writer's "whether this write
        was applied is unknown"): its retry is then refused (the workload's record moved), so a refusal after
        one reads the migration's record back first, and a commit etcd holds is adopted (`_landed`), never
        rolled back over."""
        try:
            rev = await self._adopt(m, c, ops, conds, swapped=bool(m.resize_slice)) or 0
            self.commit_unsure.discard(m.id)
            return rev
        except errors.Aborted as e:
            if m.id in self.commit_unsure:
                try:
                    landed = await self._landed(m, workload)
                except errors.MeshError as unread:
                    log(logger, logging.WARNING, "migration commit refused after one of unknown outcome, and etcd "
                        "unreadable; trying again", migration=m.id, error=str(unread))
                    await asyncio.sleep(RESEND)
                    return None
                if landed is not None:
                    return landed
            if workload is not None:
                try:
                    changed = await self.wm.refresh(workload[0]) != workload[1]
                except errors.MeshError as unread:      # etcd unreadable now: computed again after a pause
                    log(logger, logging.WARNING, "migration commit refused and the workload unreadable; trying "
                        "again", migration=m.id, workload=workload[0], error=str(unread))
                    await asyncio.sleep(RESEND)
                    return None
                if changed:
                    log(logger, logging.INFO, "the workload's record changed during the commit; computing it "
                        "again", migration=m.id, workload=workload[0])
                    return None
            self.commit_unsure.discard(m.id)
            raise _Failed(f"the commit was refused (nothing written): {e}") from None
        except errors.MeshError as e:
            self.commit_unsure.add(m.id)
            log(logger, logging.WARNING, "migration commit not written; the source stays paused, trying again",
                migration=m.id, workload=m.workload_id, error=str(e))
            await asyncio.sleep(RESEND)
            return None

    async def _landed(self, m: M.Migration, workload: tuple[str, int] | None) -> int | None:
        """After a commit write of unknown outcome, its retry refused: the revision of the commit when etcd holds
        it (the migration's record COMMITTED, adopted as `m` with the workload's record and, for a resize, the two
        swapped slice records read back), else None (it did not land: the refusal is the retry's own)."""
        got = await self.ctl.store.read(keys.migration(m.id))
        if got is None:
            return None
        stored = M.Migration.FromString(got[0])
        if stored.phase != P.MIGRATION_PHASE_COMMITTED:
            return None
        if workload is not None:
            await self.wm.refresh(workload[0])
        if m.resize_slice:          # the fleet was put back as before the swap when the write seemed to fail
            for sid in (m.resize_slice, m.target_slice):
                s = await self.ctl.store.read(keys.slice_(sid))
                if s is not None:
                    self.ctl.fleet.put_slice(types_pb2.Slice.FromString(s[0]), s[1])
        self.commit_unsure.discard(m.id)
        log(logger, logging.INFO, "the migration's commit had landed though its write seemed to fail; adopted",
            migration=m.id, workload=m.workload_id)
        m.CopyFrom(stored)
        self.migrations[m.id] = m
        self._phase_event(m)
        for q in self.watchers.get(m.id, ()):
            q.put_nowait(M.Migration.FromString(m.SerializeToString()))
        return got[1]

    async def _finish(self, m: M.Migration) -> None:
        """After the commit: the source stops and the target runs (both asked at once: the source is
        paused, so the two never run together, and a lost source node does not hold the target)."""
        if m.resize_slice:
            await self._swap_on_agents(m)
        resume = self._ask(m.id, m.target_node, M.MigrationCommand(
            migration_id=m.id, action=C.RESUME_TARGET, workload_id=m.workload_id, alias=alias(m)),
            (R.TARGET_RESUMED,), STEP_TIMEOUT * 5) if m.workload_id else None
        if alias(m):
            # Same node: the source gives the workload ID to the target process first (and stops).
            results = [None, None]
            try:
                await self._stop_source(m)
            except (StepFailed, errors.MeshError) as e:
                results[1] = e
            try:
                await resume
            except (StepFailed, errors.MeshError) as e:
                if self._target_ended(m) is None:
                    raise
                results[0] = e
        else:
            jobs = [resume] if resume is not None else []
            if not m.checkpoint_id and m.workload_id:
                jobs.append(self._stop_source(m))
            results = await asyncio.gather(*jobs, return_exceptions=True)
            if results and isinstance(results[0], BaseException) and self._target_ended(m) is None:
                raise results[0]
        if m.resize_slice:
            await self._release_old_placement(m)
        notes = []
        if results and isinstance(results[0], BaseException):
            notes.append(f"the target ended before it ran ({self._target_ended(m)}): {results[0]}")
        if len(results) > 1 and isinstance(results[1], BaseException):
            notes.append(f"source not confirmed stopped: {results[1]}")
        await self._set(m, P.MIGRATION_PHASE_DONE, message="; ".join(notes))
        self.agents_swapped.discard(m.id)

    def _target_ended(self, m: M.Migration) -> str | None:
        """After the commit the record names the target: when its agent reported it ended (it died, or was
        stopped, before it ran), RESUME_TARGET can only fail, so the migration ends (DONE, saying so) instead
        of asking forever; the workload's record shows the end. None while it may still run."""
        w = self.wm.workloads.get(m.workload_id)
        if w is None:
            return "its record is gone"
        if w.node == m.target_node and w.state not in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING,
                                                       W.WORKLOAD_STATE_UNKNOWN):
            return f"{W.WorkloadState.Name(w.state)} on {w.node}"
        return None

    async def _stop_source(self, m: M.Migration) -> None:
        await self._ask(m.id, m.source_node, M.MigrationCommand(
            migration_id=m.id, action=C.STOP_SOURCE, workload_id=m.workload_id, alias=alias(m)), (R.SOURCE_STOPPED,),
            STEP_TIMEOUT)

    async def _rollback(self, m: M.Migration) -> None:
        """Before the commit the source is the workload: stop the target, free what the migration
        allocated, resume the source. The migration stays ROLLING_BACK (in etcd: a restarted control
        plane asks again) until the source's agent confirms the source runs again, however long that
        agent is away (`_resume_source`). An unreachable target node is not waited for forever: the
        workload manager's full command stops a stray target when its agent comes back."""
        notes = []

        async def stop_target() -> None:
            if m.target_node and m.session:
                await self._ask(m.id, m.target_node, M.MigrationCommand(
                    migration_id=m.id, action=C.STOP_TARGET, workload_id=m.workload_id, alias=alias(m)),
                    (R.TARGET_STOPPED,), STEP_TIMEOUT, failures=False)

        async def resume_source() -> None:
            if m.source_node and m.workload_id and not m.checkpoint_id:
                await self._resume_source(m)
        for name, result in zip(("target", "source"), await asyncio.gather(stop_target(), resume_source(),
                                                                           return_exceptions=True)):
            if isinstance(result, BaseException):
                notes.append(f"{name}: {result}")
        for s in [s for s in self.ctl.fleet.slices.values() if s.labels.get(LABEL) == m.id]:
            try:
                await self.ctl.release(s.id, wait=False, message=f"migration {m.id} rolled back")
            except errors.MeshError as e:
                notes.append(f"release {s.id}: {e}")
        msg = m.message.removeprefix("rolling back: ")
        await self._set(m, P.MIGRATION_PHASE_ABORTED,
                        message=f"rolled back ({msg})" + (f"; {'; '.join(notes)}" if notes else ""))

    async def _resume_source(self, m: M.Migration) -> None:
        """ABORT_SOURCE until the source's agent answers SOURCE_RESUMED: asked again every RESEND seconds, so an
        agent that is away gets it on its next session, and again after a FAILED answer (the SDK did not
        answer its resume). Given up only when the source is no longer the workload: its record is gone, names
        another node, or has ended (the agent reported it ended, or its slice was deleted). UNKNOWN (the node
        NotReady: its agent away past its lease) is waited for: the agent may come back with the source paused."""
        last = ""
        while True:
            w = self.wm.workloads.get(m.workload_id)
            if w is None or w.node != m.source_node or w.state not in (W.WORKLOAD_STATE_RUNNING,
                                                                        W.WORKLOAD_STATE_UNKNOWN):
                state = "gone" if w is None else f"{W.WorkloadState.Name(w.state)} on {w.node}"
                log(logger, logging.WARNING, "rollback: the source is no longer the workload; not resumed",
                    migration=m.id, workload=m.workload_id, state=state)
                return
            try:
                await self._ask(m.id, m.source_node, M.MigrationCommand(
                    migration_id=m.id, action=C.ABORT_SOURCE, workload_id=m.workload_id), (R.SOURCE_RESUMED,),
                    STEP_TIMEOUT * 2)
                return
            except _Failed as e:
                if str(e) != last:
                    last = str(e)
                    log(logger, logging.WARNING, "rollback: the source has not resumed yet; asking again",
                        migration=m.id, workload=m.workload_id, node=m.source_node, error=last)
                await asyncio.sleep(RESEND)
