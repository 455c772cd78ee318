"""Resize a slice; the client keeps its slice ID (the MigrationManager's part for it).

* In place: an MPS or time-share slice whose GPU has room for the new size gets the new
  limits in its record and the GPU's accounting; the agent re-realizes it (new processes get
  the new limits; a hand-started vLLM is restarted with its new share: backendshare.py).
* By migration, otherwise (MIG, or a GPU without room): a slice of the new size is reserved
  wherever the scheduler puts it (the same GPU, another GPU of the node, another node),
  labelled with the migration's ID. A RUNNING workload on the slice is migrated into it by the
  usual state machine (pre-copy; on the same node the target process runs under an alias of
  the workload's ID until the source is stopped). At the commit one etcd transaction moves
  the workload, writes the new placement under the client's slice ID and the old placement
  under the reserved slice's ID; then the agents rename their realized slices to match
  (SWAP_SLICES), the target runs, the source stops and the old placement is released. A slice
  without a workload goes PLANNED -> COMMITTED -> DONE the same way.

Before the commit a failure rolls back as any migration does (the reserved slice is released,
the source resumes), so a failed resize leaves the old slice and its workload untouched; a
resize that fits nowhere is refused up front with RESOURCE_EXHAUSTED. The state machine is the
migration's, in etcd, so a control-plane restart rolls back or finishes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from controlplane.api import auth

from controlplane.state import keys
from controlplane.controllers import backendshare
from controlplane.controllers.slicereports import placement_of
from controlplane.controllers.slices import new_id, now
from controlplane.controllers.resizequota import growth_refusal
from controlplane.controllers.evictions import ReleaseDeferred
from controlplane.controllers.migration_phases import FINISHED, RESEND, STEP_TIMEOUT, C, P, R, StepFailed, W
from controlplane.state.store import Absent, Present, Put
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors, gpumodels
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.migrations")
SHARED = (types_pb2.ISOLATION_MPS, types_pb2.ISOLATION_TIMESHARE)
RESIZE_TIMEOUT = 1800.0


def _iso(s: types_pb2.Slice) -> str:
    return types_pb2.Isolation.Name(s.isolation).removeprefix("ISOLATION_")


class ResizeMixin:
    """Mixed into MigrationManager (self.ctl, self.wm, self.migrations, self._save, ...)."""

    async def resize(self, sid: str, memory_bytes: int, compute_share: float,
                     mig_profile: str = "") -> types_pb2.Slice:
        if not sid:
            raise errors.InvalidArgument.of("slice_id", "is required", "the ID of a READY slice (s-...)")
        s = self.ctl.fleet.slices.get(sid)
        if s is None:
            raise errors.NotFound(f"no slice {sid!r}", kind="slice", name=sid)
        auth.check_visible(s.tenant, "slice", sid)
        if memory_bytes < 0:
            raise errors.InvalidArgument.of("memory_bytes", f"{memory_bytes} is negative", "> 0, or 0 for unchanged")
        if not (0 <= compute_share <= 1):
            raise errors.InvalidArgument.of("compute_share", f"{compute_share} is out of range",
                                            "(0, 1], or 0 for unchanged")
        if s.state != types_pb2.SLICE_STATE_READY:
            raise errors.FailedPrecondition(f"slice {sid} is not READY")
        busy = next((m for m in self.unfinished() if sid in (m.resize_slice, m.source_slice, m.target_slice)), None)
        if busy is not None:
            raise errors.FailedPrecondition(f"slice {sid} is being moved or resized already ({busy.id}, "
                                            f"{P.Name(busy.phase).removeprefix('MIGRATION_PHASE_').lower()})")
        if s.isolation == types_pb2.ISOLATION_MIG:
            profile = self._new_profile(s, memory_bytes, compute_share, mig_profile)
            if profile == s.profile:
                return s
            return await self._resize_by_migration(s, profile=profile)
        if mig_profile:
            raise errors.InvalidArgument.of("mig_profile", f"slice {sid} is {_iso(s)}, not MIG",
                                            "empty for MPS, time-share and exclusive slices")
        mem = memory_bytes or s.memory_bytes
        share = compute_share or s.compute_share
        if (mem, share) == (s.memory_bytes, s.compute_share):
            return s
        if s.isolation not in SHARED:
            return await self._resize_by_migration(s, memory_bytes=mem, compute_share=share)
        g = self.ctl.fleet.gpu(s.node, s.gpu_index)
        if g is not None:
            free_mem = g.memory_bytes - g.allocated_memory + s.memory_bytes
            free_share = 1.0 - g.allocated_compute + s.compute_share
            if mem > free_mem or (s.isolation == types_pb2.ISOLATION_MPS and share > free_share + 1e-9):
                log(logger, logging.INFO, "resize does not fit in place; by migration", slice=sid,
                    gpu_free_bytes=free_mem, gpu_free_share=round(free_share, 3))
                return await self._resize_by_migration(s, memory_bytes=mem, compute_share=share)
        framework = getattr(self.ctl, "scheduler", None)
        why = growth_refusal(framework, self.ctl.fleet, s, mem, share) if framework is not None else None
        if why is not None:
            raise errors.ResourceExhausted(f"slice {sid} cannot grow to {mem} bytes, compute {share:.2f}: {why}; "
                                           f"the slice is unchanged", reasons={"quota": why})
        return await self._resize_in_place(s, mem, share)

    def _new_profile(self, s: types_pb2.Slice, memory_bytes: int, compute_share: float, mig_profile: str) -> str:
        g = self.ctl.fleet.gpu(s.node, s.gpu_index)
        try:
            model = g.model if g is not None else gpumodels.get_model(s.gpu_model)
        except KeyError:
            raise errors.FailedPrecondition(f"the GPU model {s.gpu_model} of slice {s.id} is unknown here") from None
        if mig_profile:
            try:
                model.profile(mig_profile)
            except KeyError as e:
                raise errors.InvalidArgument.of("mig_profile", str(e).strip("'\""),
                                                ", ".join(p.name for p in model.mig_profiles)) from None
            return mig_profile
        cur = model.profile(s.profile)
        mem = memory_bytes or cur.memory_mib * 2**20
        share = compute_share or cur.compute_slices / gpumodels.MIG_COMPUTE_SLICES
        p = model.smallest_profile_for(mem, share)
        if p is None:
            raise errors.InvalidArgument.of(
                "memory_bytes", f"no MIG profile of {model.name} holds {mem} bytes and compute share {share:.2f}",
                ", ".join(f"{x.name} ({x.memory_mib} MiB, {x.compute_slices}/7)" for x in model.mig_profiles))
        return p.name

    async def _resize_in_place(self, s: types_pb2.Slice, mem: int, share: float) -> types_pb2.Slice:
        s, shares = await backendshare.before_in_place(self.wm, self.ctl, s, mem)    # a hand-started vLLM's share
        ns = self.ctl._update(s, memory_bytes=mem, compute_share=share, message="resized in place")
        ns.resized_at.CopyFrom(ns.updated_at)       # durable: the autoresize cooldown outlives a leader
        rev = await self.ctl.save_or_restore([ns], [s])
        session = self.ctl.sessions.get(ns.node)
        if session is not None:
            session.send_upserts([ns], rev)
        log(logger, logging.INFO, "slice resized in place", slice=s.id, memory_bytes=mem, compute_share=share)
        await backendshare.after_in_place(self.wm, self.ctl, s, ns, shares)
        return ns

    async def _resize_by_migration(self, s: types_pb2.Slice, profile: str = "", memory_bytes: int = 0,
                                   compute_share: float = 0.0) -> types_pb2.Slice:
        live = sorted((x for x in self.wm.workloads.values() if x.slice_id == s.id and x.state in (
            W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING)), key=lambda x: x.id)
        if len(live) > 1:       # one migrates; the others would go down with the old placement
            raise errors.FailedPrecondition(
                f"slice {s.id} runs {len(live)} workloads ({', '.join(x.id for x in live)}): a resize by migration "
                f"moves one; stop the others first")
        w = live[0] if live else None
        starting = self.wm.new_on(s.id)[0]       # a Run's record being written: not in `workloads` yet
        if starting:
            raise errors.FailedPrecondition(f"workload {starting[0]} on slice {s.id} is starting: resize it once it "
                                            f"runs")
        if w is not None:
            if w.state != W.WORKLOAD_STATE_RUNNING:
                raise errors.FailedPrecondition(f"workload {w.id} on slice {s.id} is starting: resize it once it runs")
            busy = self.active_for(w.id)
            if busy is not None:
                raise errors.FailedPrecondition(f"workload {w.id} is migrating already ({busy.id})")
            if w.HasField("backend"):       # no checkpoint SDK: it cannot be pre-copied (CRIU goes to another node)
                raise errors.FailedPrecondition(
                    f"slice {s.id} cannot be resized in place, and a resize by migration would move its model server "
                    f"{w.id} (backend {w.backend.kind}), which moves only by CRIU to another node: stop it, resize "
                    f"the slice and run it again, or serve the model with a deployment (its replicas are replaced)")
            await self.check_sdk(w, "resize by migration")
        m = M.Migration(id=new_id("m"), workload_id=w.id if w is not None else "", tenant=s.tenant,
                        mode=M.MIGRATION_MODE_PRECOPY, phase=P.MIGRATION_PHASE_PLANNED, source_node=s.node,
                        source_slice=s.id, reason="resize", resize_slice=s.id, created_at=now())
        # the new slice is a reservation for the slice: the two count once, at the larger (migration_quota.py)
        req = self.target_request(s, m.id, profile=profile, **({} if profile else dict(
            memory_bytes=memory_bytes, compute_share=compute_share)))
        what = profile or f"{memory_bytes} bytes, compute {compute_share:.2f}"
        m.message = f"resize to {what}: reserving"
        with self._planned(m):
            await self._save(m, created=True)
        # the record exists from here: its state machine is started whatever ends this call (its client gone, a
        # write failing), else it stayed PLANNED and undriven, the slice (and a reserved one) held until a restart
        reserving = asyncio.ensure_future(self._reserve(m, s, req, what))
        reserving.add_done_callback(lambda t: t.cancelled() or t.exception())     # retrieved
        self.reserving[m.id] = reserving        # the record's writer until its state machine starts (end_for_node)
        await asyncio.shield(reserving)
        task = self.tasks.get(m.id)
        if task is not None:
            await asyncio.wait([task], timeout=RESIZE_TIMEOUT)    # not cancelled with the RPC
        m = self.migrations[m.id]
        if m.phase != P.MIGRATION_PHASE_DONE:
            raise errors.FailedPrecondition(f"resize of slice {s.id} failed ({m.id}): {m.message}; the slice and "
                                            f"its workload are unchanged"
                                            if m.phase == P.MIGRATION_PHASE_ABORTED else
                                            f"resize of slice {s.id} is still in progress ({m.id})")
        return self.ctl.fleet.slices.get(s.id, s)

    async def _reserve(self, m: M.Migration, s: types_pb2.Slice, req, what: str) -> None:
        """Reserve the slice of the new size and start the resize's state machine (in a task of its own: see
        `_resize_by_migration`). A failure before a target is recorded rolls back."""
        try:
            try:
                alloc_id, placed = await self.ctl.allocate(req, no_wait=True)
            except Exception as e:    # noqa: BLE001 - recorded, then raised as it came
                if not isinstance(e, errors.MeshError):
                    await self._set(m, P.MIGRATION_PHASE_ABORTED, message=f"rolled back ({e})")
                    raise
                await self._set(m, P.MIGRATION_PHASE_ABORTED, message=f"rolled back (no room for {what}: {e})")
                if isinstance(e, errors.ResourceExhausted):
                    raise errors.ResourceExhausted(f"slice {s.id} cannot be resized to {what}: {e}; the slice is "
                                                   f"unchanged", reasons=getattr(e, "reasons", {}) or {}) from None
                raise
            t = placed[0]
            m.target_slice, m.target_node, m.target_allocated = t.id, t.node, True
            m.message = f"resize to {what}: target {t.id} on {t.node}/{t.gpu_index}"
            await self._save(m)
            log(logger, logging.INFO, "resize by migration planned", migration=m.id, slice=s.id, to=what,
                target=t.id, target_node=t.node, workload=m.workload_id)
            try:
                await self.ctl._await_ready(alloc_id, False, 0)
            except errors.MeshError as e:
                m.message = f"rolling back: the new slice did not become ready: {e}"
                await self._set(m, P.MIGRATION_PHASE_ROLLING_BACK)
        finally:
            if m.phase not in FINISHED:
                if not m.target_slice and m.phase == P.MIGRATION_PHASE_PLANNED:
                    await self._until_written("rolling back", m, lambda: self._set(
                        m, P.MIGRATION_PHASE_ROLLING_BACK, message="rolling back: the new slice was not reserved"))
                self._spawn(m.id)
            self.reserving.pop(m.id, None)

    # -- the commit and after -------------------------------------------------------------------

    def _swapped(self, m: M.Migration) -> tuple[types_pb2.Slice, types_pb2.Slice]:
        """The two records after the swap: the client's ID at the new placement, the reserved
        slice's ID at the old one."""
        x = self.ctl.fleet.slices.get(m.resize_slice)
        t = self.ctl.fleet.slices.get(m.target_slice)
        if x is None or t is None:
            raise StepFailed(f"slice {m.resize_slice if x is None else m.target_slice} is gone")
        for s in (x, t):    # the swap takes the other record's state: a release (answered OK) would be undone
            if s.state == types_pb2.SLICE_STATE_RELEASING:
                raise StepFailed(f"slice {s.id} is being released ({s.message or 'released'})")
        nx, nt = types_pb2.Slice(), types_pb2.Slice()
        nx.CopyFrom(t)
        nt.CopyFrom(x)
        for n, keep in ((nx, x), (nt, t)):
            n.id, n.allocation_id, n.tenant, n.priority = keep.id, keep.allocation_id, keep.tenant, keep.priority
            n.labels.clear()
            n.labels.update(keep.labels)
            n.anti_affinity.clear()
            n.anti_affinity.update(keep.anti_affinity)
            n.created_at.CopyFrom(keep.created_at)
            n.updated_at.CopyFrom(now())
            if "GPUMESH_SLICE_ID" in n.env:
                n.env["GPUMESH_SLICE_ID"] = n.id
        nx.resized_at.CopyFrom(nx.updated_at)     # the client's slice was resized now (the autoresize cooldown)
        was = x.profile or f"{x.memory_bytes} bytes"
        nx.message = f"resized from {was} on {x.node}/{x.gpu_index} ({m.id})"
        nt.message = f"old placement of {x.id} (resize {m.id})"
        return nx, nt

    async def _save_swapped(self, m: M.Migration, ops: list, conds: list) -> int:
        """The commit of a resize: the migration, the workload (given) and both slice records in
        one transaction."""
        x, t = self.ctl.fleet.slices.get(m.resize_slice), self.ctl.fleet.slices.get(m.target_slice)
        nx, nt = self._swapped(m)
        m.updated_at.CopyFrom(now())
        self._swapping(nx, nt)
        self.ctl.fleet.put_slice(nx)
        self.ctl.fleet.put_slice(nt)
        try:
            rev = await self.ctl.save([nx, nt], extra=[Put(keys.migration(m.id), m.SerializeToString()), *ops],
                                extra_conds=[Present(keys.migration(m.id)), *conds])
        except BaseException as e:
            self._swapped_on_agents(nx.id, nt.id)
            for sid in (nx.id, nt.id):      # a release meanwhile: `_unswap` sends its removal, to its placement
                getattr(self.ctl, "held_removals", {}).pop(sid, None)
            await self._unswap(((nx, x), (nt, t)), write=not isinstance(e, asyncio.CancelledError))
            raise
        self.migrations[m.id] = m
        for q in self.watchers.get(m.id, ()):
            q.put_nowait(M.Migration.FromString(m.SerializeToString()))
        return rev

    async def _unswap(self, pairs, write: bool) -> None:
        """After a failed commit: each (swapped, prior) record back as before the swap. A record the fleet still
        holds as the commit left it is the prior again. One another change was built on meanwhile (a release, its
        node lost) keeps that change (state, message) in the prior's placement, and is written: that change's own
        write carried the swapped placement and may be in etcd though the commit is not (a later transaction).
        Putting the bare prior back lost the change, and the commit's retry swapped from a READY record again: a
        release answered OK was undone. Keeping the swapped record instead, the retry would swap it back."""
        kept = []
        for new, prior in pairs:
            cur = self.ctl.fleet.slices.get(new.id)
            if cur is new:
                self.ctl.fleet.put_slice(prior)
            elif cur is not None:
                back = types_pb2.Slice()
                back.CopyFrom(prior)
                back.state, back.message = cur.state, cur.message
                back.updated_at.CopyFrom(cur.updated_at)
                self.ctl.fleet.put_slice(back)
                kept.append(back)
        if not kept or not write:
            return
        try:
            rev = await self.ctl.save(kept)
        except Exception as e:  # noqa: BLE001 - the commit's own failure is what its caller handles
            log(logger, logging.WARNING, "a change made during a failed resize commit is not written back at its "
                "placement", slices=[s.id for s in kept], error=str(e))
            return
        for s in kept:
            session = self.ctl.sessions.get(s.node)
            if session is None:
                continue
            if s.state == types_pb2.SLICE_STATE_RELEASING:
                session.send_removals([s.id], rev)
            else:
                session.send_upserts([s], rev)

    async def _commit_idle_resize(self, m: M.Migration) -> None:
        """A slice without a workload: swap the placements at once (PLANNED -> COMMITTED)."""
        s = self.ctl.fleet.slices.get(m.target_slice)
        if s is None or s.state != types_pb2.SLICE_STATE_READY:
            raise StepFailed(f"target slice {m.target_slice} is not READY")
        if any(x.slice_id == m.resize_slice and x.state in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING)
               for x in self.wm.workloads.values()):
            raise StepFailed(f"a workload started on slice {m.resize_slice} meanwhile: resize again")
        conds = self._no_run_starting(m)
        c = M.Migration()
        c.CopyFrom(m)
        c.phase = P.MIGRATION_PHASE_COMMITTED
        c.message = ""
        while await self._write_commit(m, c, [], conds) is None:     # adopted only once etcd holds it
            pass
        log(logger, logging.INFO, "resize committed", migration=m.id, slice=m.resize_slice)

    def _no_run_starting(self, m: M.Migration) -> list:
        """A resize's commit (none for another migration) and the Runs on its slice that passed their guards before
        it was planned (WorkloadManager.run: their records are not in `wm.workloads` until written). One whose write
        is in flight fails the commit: landing beside it, its workload was left on the old placement, released with
        it. Those written without a verdict (they may have landed) each give the commit transaction a condition,
        returned: their record absent."""
        if not m.resize_slice:
            return []
        writing, unsure = self.wm.new_on(m.resize_slice)
        if writing:
            raise StepFailed(f"a workload is being started on slice {m.resize_slice} ({', '.join(writing)}): resize "
                             f"again once it runs")
        return [Absent(keys.workload(wid)) for wid in unsure]

    async def _swap_on_agents(self, m: M.Migration) -> None:
        """Every node holding one of the two placements renames its realized slices."""
        nx, nt = self.ctl.fleet.slices.get(m.resize_slice), self.ctl.fleet.slices.get(m.target_slice)
        records = [s for s in (nx, nt) if s is not None]
        nodes = sorted({s.node for s in records})
        self._swapping(*records)        # again: a new leader resuming the commit
        try:
            results = await asyncio.gather(*[self._ask(m.id, node, M.MigrationCommand(
                migration_id=m.id, action=C.SWAP_SLICES, workload_id=m.workload_id, slices=records),
                (R.SLICES_SWAPPED,), STEP_TIMEOUT) for node in nodes], return_exceptions=True)
        finally:        # both IDs: a record gone since the commit (its node deleted) was guarded too
            self._swapped_on_agents(m.resize_slice, m.target_slice)
        for node, r in zip(nodes, results):
            if isinstance(r, BaseException):
                if node == m.source_node and node != m.target_node and m.target_slice in self.ctl.fleet.slices:
                    # the old placement's node is gone: its full reconcile (by placement) fixes it
                    log(logger, logging.WARNING, "old placement's node did not swap", migration=m.id, node=node,
                        error=str(r))
                    continue
                raise r
        self.agents_swapped.add(m.id)
        self._send_held_removals(m.resize_slice, m.target_slice)

    def _removal_held(self, s: types_pb2.Slice) -> bool:
        """A removal hook (Controller.removal_holds): the removal of the client's slice of a resize, released from
        the commit's write until its agents answer SWAP_SLICES, waits for that answer (`_send_held_removals`; the
        reserved slice is not released then: `_refuse_old_placement`). Meanwhile the record names the new
        placement and the agent the old one by its ID: its tenant's release sent then went to the new placement's
        node, whose agent names that one by the reserved slice's ID. On another node nothing was torn down, and
        the swap (the record gone) left both instances realized with no record; on the same node the old
        placement was torn down and a MIG swap found nothing at it: the resize retried it for good."""
        return any(m.resize_slice == s.id and (
            s.id in self.ctl.swapping or (m.phase == P.MIGRATION_PHASE_COMMITTED and m.id not in self.agents_swapped))
            for m in self.unfinished())

    def _send_held_removals(self, *ids: str) -> None:
        """After the agents swapped: the removal of each of `ids` whose record is RELEASING, to the node of its
        placement now. Read from the record, not from the removals this leader held (`held_removals`): a leader
        that resumes the commit after a restart holds none, though a release written before it (the client's,
        held for the swap; the resize's own of the old placement, its removal lost with that leader) is in etcd,
        and its release was never sent (the agent renames a RELEASING record's instance for its removal)."""
        held = getattr(self.ctl, "held_removals", {})
        for sid in ids:
            rev = held.pop(sid, None)
            s = self.ctl.fleet.slices.get(sid)
            if s is None or s.state != types_pb2.SLICE_STATE_RELEASING:
                continue
            rev = rev or self.ctl.fleet.revisions.get(sid) or self.ctl.revision
            session = self.ctl.sessions.get(s.node)
            if session is not None:     # else its agent's full reconcile on its return tears it down
                session.send_removals([sid], rev)
            log(logger, logging.INFO, "removal held during a resize's swap sent", slice=sid, node=s.node)

    def _swapping(self, *records: types_pb2.Slice) -> None:
        """From the commit until the agents answer SWAP_SLICES, an agent's report still names each realized
        slice by its ID before the swap: the one it gives for the client's ID is the old placement's state,
        device and MIG instances, which the report handler (Controller.report) wrote over the swapped record
        (and a full report found the renamed slice missing: PENDING). It ignores, for these IDs, a report
        naming another placement than the record's (slicereports.placement_of: with the limits in the env, for a
        resize on the slice's own GPU); the agent's statuses after the swap name the record's."""
        for s in records:
            self.ctl.swapping[s.id] = placement_of(s.device_uuid, s.gpu_instance_id, s.compute_instance_id, s.env)

    def _swapped_on_agents(self, *ids: str) -> None:
        for sid in ids:
            self.ctl.swapping.pop(sid, None)

    async def _release_old_placement(self, m: M.Migration) -> None:
        if m.target_slice in self.ctl.fleet.slices:
            self.releasing_old.add(m.target_slice)      # its own release passes `_refuse_old_placement`
            try:
                await self.ctl.release(m.target_slice, wait=False, message=f"old placement of {m.resize_slice} "
                                                                           f"(resize {m.id})")
            except errors.NotFound:
                pass
            finally:
                self.releasing_old.discard(m.target_slice)

    async def _refuse_old_placement(self, slices: list, wait: bool) -> None:
        """A release hook (Controller.release): a resize's reserved slice is not released by anyone else from its
        commit's write until the resize releases it itself (after SWAP_SLICES and the source's stop). The commit
        gives its ID the old placement while its agent still names the new one by it: the removal sent for it
        tore down the new placement and the workload moved into it (and, after the swap, the paused source before
        it handed the workload over). Before the commit a release of it rolls the resize back, as before. The
        refusal says how to wait for the resize's own release: a drain or a preemption does (evictions.py)."""
        for s in slices:
            if s.id in self.releasing_old:
                continue
            m = self._old_placement_of(s.id)
            if m is not None:
                raise ReleaseDeferred(
                    f"slice {s.id} is the old placement of slice {m.resize_slice}, whose resize ({m.id}) has "
                    f"committed: the resize releases it when it ends; release it then if it is still there",
                    until=functools.partial(self._until_old_placement_released, s.id))

    def _old_placement_of(self, sid: str) -> M.Migration | None:
        """The resize in whose commit window slice `sid` is the reserved slice (the old placement from the commit's
        write on), if any."""
        return next((m for m in self.unfinished() if m.resize_slice and m.target_slice == sid and (
            m.phase == P.MIGRATION_PHASE_COMMITTED or sid in self.ctl.swapping)), None)

    async def _until_old_placement_released(self, sid: str, timeout: float) -> None:
        """Until slice `sid` is released by its resize (RELEASING or gone) or no longer in a commit window (the
        resize ended, or its commit failed), at most `timeout` seconds: its state machine's end is awaited, the
        slice looked at again every RESEND seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (m := self._old_placement_of(sid)) is not None:
            s = self.ctl.fleet.slices.get(sid)
            left = deadline - loop.time()
            if s is None or s.state == types_pb2.SLICE_STATE_RELEASING or left <= 0:
                return
            task = self.tasks.get(m.id)
            if task is not None and not task.done():
                await asyncio.wait([task], timeout=min(left, RESEND))
            else:
                await asyncio.sleep(min(left, RESEND))
