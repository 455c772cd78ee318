"""The agent's side of migrations, checkpoints and restores (ControllerMessage `migration`).

The control plane drives a migration's state machine (controlplane/controllers/migrations.py) and asks
the agents for one idempotent step at a time (`MigrationCommand`); it repeats a step until
the answer (`MigrationReport`) arrives, so a step that was asked twice, or asked again after
a reconnect, does its work once and answers again.

* target agent: START_TARGET starts the workload (same ID) on the target slice with
  `GPUMESH_RESTORE_FROM=receive:SESSION@HOST:0` (HOST: `transfer_host`, by default the local
  address that reaches the control plane; never every interface), `GPUMESH_RESTORE_HOLD=1` and
  `GPUMESH_TRANSFER_SECRET_FILE` (a 0600 file holding the migration's secret, which the control
  plane sent in the command and the workload removes once read) and answers with the address
  it listens on; PUSH_CHECKPOINT sends a stored checkpoint to it (restore);
  RESUME_TARGET lets it run once the commit is durable; STOP_TARGET stops it (rollback).
* source agent: SEND runs `PrecopyMigration` (or stop-and-copy) from the workload's control
  socket to the target's address, without stopping the source: it ends with the source
  paused at a safe point and the target restored and holding. STOP_SOURCE stops the source
  after the commit; ABORT_SOURCE cancels a send and resumes the source (rollback);
  CHECKPOINT writes a consistent checkpoint into the store (`checkpoint_dir`), encrypted
  with the tenant's key when `checkpoint_keys_file` has one, else with the checkpoint's own key
  from the control plane (`checkpoint_key`): every stored checkpoint is authenticated.
* transparent mode (CRIU, no SDK): the same steps dump the process on the source, ship the
  images and restore them on the target under a new shim (nodeagent/migrate_slices.py).

Every transfer proves the migration's secret (`MigrationCommand.secret`, 32 random bytes from
the control plane; a checkpoint's is drawn here) and is sealed with keys derived from it
(mesh/checkpoint/transfer_auth.py); agent-to-agent transfers also use the agents' mTLS when
the agent is secured. The secret is never logged and never put in a workload's environment.

Where the steps are: nodeagent/migrate_base.py (the `Job`, reporting, the shared helpers),
migrate_source.py (SEND, STOP_SOURCE, ABORT_SOURCE), migrate_target.py (START_TARGET, PUSH_CHECKPOINT,
RESUME_TARGET, STOP_TARGET), migrate_checkpoint.py (CHECKPOINT, DELETE_CHECKPOINT), migrate_slices.py
(same-node hand-over, SWAP_SLICES, transparent mode); this module dispatches the commands to them.
"""

from __future__ import annotations

import asyncio
import logging

from gpumesh.v1 import migration_service_pb2 as M
from mesh.logs import log
from nodeagent.ids import BadId, check_ids
from nodeagent.migrate_base import Cancelled, Job, MigrationBase
from nodeagent.migrate_checkpoint import CheckpointSteps, clean_store
from nodeagent.migrate_slices import SlicesMixin
from nodeagent.migrate_source import SourceSteps
from nodeagent.migrate_target import TARGET_LISTEN_TIMEOUT, TargetSteps

__all__ = ["MigrationAgent", "install", "Job", "Cancelled", "MigrationBase", "TARGET_LISTEN_TIMEOUT"]

logger = logging.getLogger(__name__)
C = M.MigrationCommand
R = M.MigrationReport


class MigrationAgent(SourceSteps, TargetSteps, CheckpointSteps, SlicesMixin):
    """The agent's migration handler: one per agent, on its workload runner (`install`)."""

    def install(self) -> "MigrationAgent":
        self.agent.handlers["migration"] = self.on_command
        self.agent.session_hooks.append(self._on_session)
        return self

    def _on_session(self, outbox: asyncio.Queue) -> None:
        self.outbox = outbox

    # -- commands -----------------------------------------------------------------------

    async def on_command(self, cmd: M.MigrationCommand, outbox: asyncio.Queue) -> None:
        self.outbox = outbox
        self.loop = asyncio.get_running_loop()
        report = self._reporter(cmd.migration_id)
        try:
            handler = {C.START_TARGET: self._start_target, C.SEND: self._send_state,
                       C.PUSH_CHECKPOINT: self._push_checkpoint, C.RESUME_TARGET: self._resume_target,
                       C.STOP_SOURCE: self._stop_source, C.ABORT_SOURCE: self._abort_source,
                       C.STOP_TARGET: self._stop_target, C.CHECKPOINT: self._checkpoint,
                       C.SWAP_SLICES: self._swap_slices, C.CHECK_TRANSPARENT: self._check_transparent,
                       C.CHECK_SDK: self._check_sdk,
                       C.DELETE_CHECKPOINT: self._delete_checkpoint}[cmd.action]
        except KeyError:
            report(R.FAILED, message=f"unknown migration action {cmd.action}")
            return
        try:        # records, files, cgroups and CRIU images are named after them (nodeagent/ids.py)
            check_ids(("migration_id", cmd.migration_id), ("workload_id", cmd.workload_id), ("alias", cmd.alias),
                      ("workload.id", cmd.workload.id), ("workload.slice_id", cmd.workload.slice_id),
                      *((f"slices[{i}].id", s.id) for i, s in enumerate(cmd.slices)))
        except BadId as e:
            log(logger, logging.WARNING, "migration command refused", node=self.agent.node,
                action=C.Action.Name(cmd.action), error=str(e))
            report(R.FAILED, message=f"{C.Action.Name(cmd.action).lower()} on {self.agent.node}: {e}")
            return
        try:
            await handler(cmd, report)
        except Exception as e:   # noqa: BLE001 - every failure goes back to the control plane
            log(logger, logging.WARNING, "migration step failed", node=self.agent.node,
                migration=cmd.migration_id, action=C.Action.Name(cmd.action), error=str(e))
            report(R.FAILED, message=f"{C.Action.Name(cmd.action).lower()} on {self.agent.node}: {e}")


def install(agents, cfg) -> None:
    """One MigrationAgent per agent, on its workload runner."""
    tls = None
    if not getattr(cfg, "insecure", True) and getattr(cfg, "tls_cert", ""):
        tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    clean_store(getattr(cfg, "checkpoint_dir", ""))      # the store may be shared by every agent here: once
    for a in agents:
        runner = getattr(a, "workload_runner", None)
        if runner is not None:
            MigrationAgent(a, runner, getattr(cfg, "checkpoint_dir", ""), getattr(cfg, "checkpoint_keys_file", ""),
                           getattr(cfg, "transfer_host", ""), tls,
                           getattr(cfg, "transfer_idle_timeout_seconds", None),
                           getattr(cfg, "checkpoint_timeout_seconds", None)).install()
