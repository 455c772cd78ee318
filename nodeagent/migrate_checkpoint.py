"""The agent's checkpoint-store steps: CHECKPOINT writes a consistent checkpoint of a running workload into
the store (`checkpoint_dir`), encrypted with the tenant's key when `checkpoint_keys_file` has one, else with the
checkpoint's own key from the control plane (`checkpoint_key`): every stored checkpoint is authenticated.
DELETE_CHECKPOINT removes an expired checkpoint's files. (A restore from the store is the target's
PUSH_CHECKPOINT: nodeagent/migrate_target.py.)

Mixed into `MigrationAgent` (nodeagent/migrate.py) on `MigrationBase` (nodeagent/migrate_base.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from gpumesh.v1 import migration_service_pb2 as M
from mesh.checkpoint.agent_link import AgentLink
from mesh.logs import log
from nodeagent.migrate_base import MigrationBase

logger = logging.getLogger("nodeagent.migrate")
R = M.MigrationReport


class CheckpointSteps(MigrationBase):
    """CHECKPOINT and DELETE_CHECKPOINT (see the module's docstring)."""

    async def _checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.workload_id
        if not self._running(wid):
            raise RuntimeError(f"workload {wid} does not run on {self.agent.node}")
        path = self._store_path(cmd.path)
        key, kind = self._key(cmd.tenant), "tenant"
        if key is None:
            key, kind = cmd.checkpoint_key, "checkpoint"      # the checkpoint's own: it is authenticated anyway
            if len(key) != 32:
                raise RuntimeError("the control plane sent no checkpoint key (an older control plane?): refused")

        def run() -> M.MigrationReport:
            from mesh.checkpoint.store import StoreSink
            from mesh.checkpoint.transfer import TransferServer
            from mesh.checkpoint.transfer_auth import new_secret
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)     # the store is the agents' alone
            server = TransferServer("127.0.0.1:0").start()
            session = f"ckpt-{uuid.uuid4().hex[:12]}"
            secret = new_secret()       # both ends are here: the workload gets it over its control socket
            try:
                sess = server.expect(session, StoreSink(path, wid, key=key, tenant=cmd.tenant,
                                                        checkpoint_id=cmd.migration_id, key_kind=kind),
                                     mesh=True, secret=secret)
                t0 = time.perf_counter()
                with AgentLink(self._socket(wid), timeout=600) as link:
                    r = link.call("checkpoint", target=server.address, session=session, secret=secret.hex())
                seconds = time.perf_counter() - t0
                done = sess.committed or {}
                nbytes = int(done.get("bytes", r.get("bytes", 0)))
                return M.MigrationReport(migration_id=cmd.migration_id, event=R.CHECKPOINTED, path=cmd.path,
                                         step=int(r.get("step", 0)), bytes=nbytes, seconds=seconds,
                                         mb_per_s=nbytes / 1e6 / max(seconds, 1e-9), encrypted=kind == "tenant")
            finally:
                server.stop(0)
        rep = await asyncio.to_thread(run)
        log(logger, logging.INFO, "checkpoint written", node=self.agent.node, workload=wid, path=path,
            step=rep.step, bytes=rep.bytes, encrypted=rep.encrypted)
        self._send(rep)

    async def _delete_checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        """The checkpoint's record expired (controlplane/controllers/retention.py): remove its files from the store."""
        import shutil
        path = self._store_path(cmd.path)
        await asyncio.to_thread(shutil.rmtree, path, True)
        log(logger, logging.INFO, "expired checkpoint deleted", node=self.agent.node, path=cmd.path)
