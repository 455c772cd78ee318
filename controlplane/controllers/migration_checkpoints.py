"""Checkpoints into the store and restores from it (the MigrationManager's part for them).

`Checkpoint` asks the workload's agent to write a consistent checkpoint into the store
(agents' `checkpoint_dir`, encrypted per tenant when keys are configured); the record is
`/gpumesh/v1/checkpoints/<id>`. `Restore` is a migration without a source: the target agent
pushes the stored checkpoint into the receiving target, and the rest is the migration state
machine of controlplane/controllers/migrations.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from controlplane.api import auth

from controlplane.controllers.checkpoint_quota import CheckpointQuota
from controlplane.state import keys
from controlplane.controllers.slices import new_id, now
from controlplane.state.store import Absent, Put
from gpumesh.v1 import migration_service_pb2 as M
from mesh import errors
from mesh.checkpoint.store import QUOTA_NAME
from mesh.logs import log

from controlplane.controllers.migration_phases import C, P, R, StepFailed, StepTimedOut, W

logger = logging.getLogger("controlplane.controllers.migrations")
# CHECKPOINT is sent again this often until answered: the agent's step is repeat-safe by checkpoint id
# (nodeagent/migrate_checkpoint.py), so an agent that restarted mid-checkpoint is asked again within seconds
# instead of the call waiting until copy_idle_timeout_seconds passed without progress; each repeat while it runs is
# answered with its progress (the bytes received so far)
CHECKPOINT_RESEND = 3.0


class CheckpointsMixin:
    """Mixed into MigrationManager (self.ctl, self.wm, self.checkpoints, self._ask, ...)."""

    # the tenants' checkpoint quotas (unlimited unless the server sets one from its configuration)
    checkpoint_quota: CheckpointQuota = CheckpointQuota()

    async def checkpoint(self, wid: str) -> M.CheckpointInfo:
        from controlplane.controllers.migration_records import check_workload_id
        check_workload_id(wid)
        w = self.wm.get(wid)
        if w.state != W.WORKLOAD_STATE_RUNNING:
            raise errors.FailedPrecondition(f"workload {wid} is not RUNNING: nothing to checkpoint")
        if self.ctl.sessions.get(w.node) is None:
            raise errors.Unavailable(f"node {w.node} is not connected")
        quota = self.checkpoint_quota
        quota.remaining(self.checkpoints, w.tenant)     # refused up front: at or past the limit
        lock = quota.lock(w.tenant)
        if lock is None:
            return await self._checkpoint(w, 0)
        async with lock:        # a limited tenant's checkpoints one at a time: each is told what the others left
            return await self._checkpoint(w, quota.remaining(self.checkpoints, w.tenant))

    async def _checkpoint(self, w, max_bytes: int) -> M.CheckpointInfo:
        wid = w.id
        ck_id = new_id("ck")
        path = f"{w.tenant or 'default'}/{wid}/{ck_id}"
        ck_key = secrets.token_bytes(32)    # seals it where the tenant has no key (stored with the record)
        try:
            rep = await self._ask(ck_id, w.node, M.MigrationCommand(
                migration_id=ck_id, action=C.CHECKPOINT, workload_id=wid, path=path, tenant=w.tenant,
                checkpoint_key=ck_key, max_bytes=max_bytes),
                (R.CHECKPOINTED,), timeout=self.copy_timeout, resend=CHECKPOINT_RESEND, idle=self.copy_idle_timeout)
        except asyncio.CancelledError:      # the caller went away (its deadline, a cancelled call) or leadership
            self._give_up_checkpoint(w, ck_id, path)
            raise
        except StepFailed as e:
            if isinstance(e, StepTimedOut):
                self._give_up_checkpoint(w, ck_id, path)
            if max_bytes and QUOTA_NAME in str(e):      # the agent's receiver refused it past what was left
                raise self.checkpoint_quota.refused(w.tenant, f"checkpoint of {wid} refused: {e}") from None
            raise errors.FailedPrecondition(f"checkpoint of {wid} failed: {e}") from None
        finally:
            self.reports.pop(ck_id, None)
        if max_bytes and rep.bytes > max_bytes:
            # an agent that does not know max_bytes (older) stored more than was left: the record keeps it (its
            # files are in the store; retention deletes them), the next checkpoint is refused up front
            log(logger, logging.WARNING, "checkpoint past its tenant's quota (the agent did not bound it)",
                checkpoint=ck_id, workload=wid, bytes=rep.bytes, allowed=max_bytes)
        ck = M.CheckpointInfo(id=ck_id, workload_id=wid, tenant=w.tenant, node=w.node, path=rep.path, step=rep.step,
                              bytes=rep.bytes, seconds=rep.seconds, mb_per_s=rep.mb_per_s, encrypted=rep.encrypted,
                              created_at=now())
        await self.ctl.writer.write([Put(keys.checkpoint(ck_id), ck.SerializeToString()),
                                     Put(keys.checkpoint_key(ck_id), ck_key)], [Absent(keys.checkpoint(ck_id))])
        self.checkpoints[ck_id] = ck
        self.checkpoint_keys[ck_id] = ck_key
        log(logger, logging.INFO, "checkpoint stored", checkpoint=ck_id, workload=wid, step=ck.step, bytes=ck.bytes)
        return ck

    def _give_up_checkpoint(self, w, ck_id: str, path: str) -> None:
        """The control plane no longer waits for checkpoint `ck_id`, which its agent may still be writing: the agent
        is told to give it up and remove what it wrote, else a checkpoint it committed later would be named by no
        record. An agent that does not get this gives it up once the command stops coming (migrate_checkpoint.py)."""
        self._send(w.node, M.MigrationCommand(migration_id=ck_id, action=C.DELETE_CHECKPOINT, path=path,
                                              workload_id=w.id, tenant=w.tenant))

    async def restore(self, ck_id: str, to_node: str = "", to_slice: str = "") -> M.Migration:
        if not ck_id:
            raise errors.InvalidArgument.of("checkpoint_id", "is required", "the ID of a checkpoint (ck-...)")
        ck = self.checkpoints.get(ck_id)
        if ck is None:
            raise errors.NotFound(f"no checkpoint {ck_id!r}", kind="checkpoint", name=ck_id)
        auth.check_visible(ck.tenant, "checkpoint", ck_id)
        w = self.wm.get(ck.workload_id)
        if w.state in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING):
            raise errors.FailedPrecondition(f"workload {w.id} is running on {w.node}: migrate it, or stop it "
                                            f"before restoring a checkpoint (never two copies)")
        busy = self.active_for(w.id)
        if busy is not None:
            raise errors.FailedPrecondition(f"workload {w.id} has a migration in progress ({busy.id})")
        m = M.Migration(id=new_id("m"), workload_id=w.id, tenant=w.tenant, mode=M.MIGRATION_MODE_STOP_AND_COPY,
                        phase=P.MIGRATION_PHASE_PLANNED, source_node=w.node, source_slice=w.slice_id,
                        reason="restore", checkpoint_id=ck_id, created_at=now())
        self._set_target(m, to_slice, to_node)
        if not to_slice and w.slice_id not in self.ctl.fleet.slices:
            # a target slice is placed like the workload's (its spec), also on a named node: without it, only a
            # named slice will do (its node deleted, or its allocation released)
            raise errors.FailedPrecondition(f"the workload's slice {w.slice_id} is gone: name a slice (to_slice)")
        with self._planned(m):
            await self._save(m, created=True)
        self._spawn(m.id)
        return m
