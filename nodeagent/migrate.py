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
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.checkpoint.agent_link import HOLD_ENV, RESTORE_ENV, AgentLink
from mesh.logs import log
from nodeagent.migrate_slices import SlicesMixin

logger = logging.getLogger(__name__)
C = M.MigrationCommand
R = M.MigrationReport
TARGET_LISTEN_TIMEOUT = 90.0


class Cancelled(Exception):
    """The control plane rolled the migration back while the send ran."""


@dataclass
class Job:
    migration_id: str
    workload_id: str
    cancelled: bool = False
    done: bool = False
    final: Any = None                  # the last report (RESTORED or FAILED), re-sent on a repeated step
    committed: dict = field(default_factory=dict)
    thread: threading.Thread | None = None
    bytes_sent: int = 0
    state_bytes: int = 0
    address: str = ""
    server: Any = None                 # transparent mode: the target's transfer server for the images
    images: str = ""                   # transparent mode: where the target receives them


class _SourceLink:
    """The source's control socket as the pre-copy engine sees it: refuses new work once the job
    is cancelled, and reports rounds and the pause as they happen."""

    ALWAYS = ("precopy_abort", "resume", "status")

    def __init__(self, link: AgentLink, job: Job, report) -> None:
        self.link, self.job, self.report = link, job, report

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        if self.job.cancelled and cmd not in self.ALWAYS:
            raise Cancelled(f"migration {self.job.migration_id} was rolled back")
        r = self.link.call(cmd, **args)
        if cmd == "status" and not self.job.state_bytes:
            self.job.state_bytes = int(r.get("state_bytes", 0))
        if cmd == "pause":
            self.report(R.SOURCE_PAUSED, step=int(r.get("step", 0)))
        if cmd in ("precopy_begin", "precopy_round", "final"):
            self.job.bytes_sent += int(r.get("bytes", 0))
            if cmd == "final":
                self.job.committed = r.get("committed") or {}
            self.report(R.PROGRESS, round=M.MigrationRound(
                round=int(r.get("round", 0)), entries=int(r.get("entries", 0)), bytes=int(r.get("bytes", 0)),
                seconds=float(r.get("seconds", 0.0)), paused=cmd == "final"),
                bytes=self.job.bytes_sent, mb_per_s=float(r.get("mb_per_s", 0.0)), transfer=r.get("transport", ""))
        return r


class _RemoteTarget:
    """The target as seen from the source host: its address is known, and the commit's answer
    (carried back on the transfer stream) says that it restored."""

    def __init__(self, address: str, session: str, job: Job) -> None:
        self.address, self.session, self.job = address, session, job

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        if cmd == "status":
            return {"receive_address": self.address, "receive_session": self.session}
        if cmd == "wait_restored":
            if "step" not in self.job.committed:
                raise ConnectionError("the target did not confirm the restore")
            return {"step": self.job.committed["step"]}
        raise ValueError(f"remote target: {cmd!r} is not available across hosts")


class MigrationAgent(SlicesMixin):
    def __init__(self, agent, runner, checkpoint_dir: str = "", keys_file: str = "", transfer_host: str = "",
                 tls: tuple[str, str, str] | None = None) -> None:
        self.agent = agent
        self.runner = runner
        self.checkpoint_dir = checkpoint_dir
        self.keys_file = keys_file
        self.transfer_host = transfer_host
        self.tls = tls
        """(ca, cert, key) of this agent's certificate when the agent is secured: agent-to-agent
        transfers speak mTLS with it."""
        self.jobs: dict[tuple[str, str], Job] = {}      # (migration id, role) -> job
        self.outbox: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> "MigrationAgent":
        self.agent.handlers["migration"] = self.on_command
        self.agent.session_hooks.append(self._on_session)
        return self

    def _on_session(self, outbox: asyncio.Queue) -> None:
        self.outbox = outbox

    # -- reporting (from the loop or from worker threads) ---------------------------------

    def _send(self, rep: M.MigrationReport) -> None:
        msg = node_service_pb2.AgentMessage(migration=rep)
        outbox, loop = self.outbox, self.loop
        if outbox is None or loop is None:
            return
        try:
            if threading.current_thread() is threading.main_thread():
                outbox.put_nowait(msg)
            else:
                loop.call_soon_threadsafe(outbox.put_nowait, msg)
        except RuntimeError:
            pass    # the loop is closing

    def _reporter(self, mid: str):
        def report(event: int, **fields: Any) -> M.MigrationReport:
            rep = M.MigrationReport(migration_id=mid, event=event, **fields)
            self._send(rep)
            return rep
        return report

    # -- helpers ------------------------------------------------------------------------

    def _socket(self, wid: str) -> str:
        return self.runner.socket_path(wid)

    def _running(self, wid: str) -> bool:
        w = self.runner.workloads.get(wid)
        return w is not None and w.state == types_pb2.WORKLOAD_STATE_RUNNING

    def _advertise_host(self) -> str:
        from nodeagent.registrar import route_source
        return route_source(self.agent.endpoint)

    def _listen_host(self) -> str:
        """Where transfer receivers listen: `transfer_host`, else the address peers reach us at."""
        return self.transfer_host or self._advertise_host()

    def _dial_host(self) -> str:
        host = self._listen_host()
        return self._advertise_host() if host in ("0.0.0.0", "::", "[::]") else host

    def _server_credentials(self):
        if self.tls is None:
            return None
        from mesh import tls
        ca, cert, key = self.tls
        return tls.server_credentials(cert, key, client_ca=ca, require_client_auth=True)

    def _channel_credentials(self):
        if self.tls is None:
            return None
        from mesh import tls
        ca, cert, key = self.tls
        return tls.channel_credentials(ca, cert, key)

    @staticmethod
    def _secret(cmd: M.MigrationCommand) -> bytes:
        from mesh.checkpoint.transfer_auth import check_secret
        if not cmd.secret:
            raise RuntimeError("the control plane sent no transfer secret for this migration (an older control "
                               "plane?): refused")
        return check_secret(cmd.secret, "MigrationCommand.secret")

    def _key(self, tenant: str) -> bytes | None:
        if not self.keys_file:
            return None
        from mesh.checkpoint.store import load_keys
        return load_keys(self.keys_file).get(tenant)

    def _store_path(self, rel: str) -> str:
        if not self.checkpoint_dir:
            raise RuntimeError(f"node {self.agent.node} has no checkpoint store: set checkpoint_dir")
        path = os.path.normpath(os.path.join(self.checkpoint_dir, rel))
        if not path.startswith(os.path.normpath(self.checkpoint_dir) + os.sep):
            raise RuntimeError(f"checkpoint path {rel!r} leaves the store")
        return path

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
                       C.DELETE_CHECKPOINT: self._delete_checkpoint}[cmd.action]
        except KeyError:
            report(R.FAILED, message=f"unknown migration action {cmd.action}")
            return
        try:
            await handler(cmd, report)
        except Exception as e:   # noqa: BLE001 - every failure goes back to the control plane
            log(logger, logging.WARNING, "migration step failed", node=self.agent.node,
                migration=cmd.migration_id, action=C.Action.Name(cmd.action), error=str(e))
            report(R.FAILED, message=f"{C.Action.Name(cmd.action).lower()} on {self.agent.node}: {e}")

    async def _delete_checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        """The checkpoint's record expired (controlplane/controllers/retention.py): remove its files from the store."""
        import shutil
        path = self._store_path(cmd.path)
        await asyncio.to_thread(shutil.rmtree, path, True)
        log(logger, logging.INFO, "expired checkpoint deleted", node=self.agent.node, path=cmd.path)

    async def _start_target(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.workload.id
        if cmd.mode == M.MIGRATION_MODE_TRANSPARENT:
            return await self._start_target_transparent(cmd, report)
        job = self.jobs.get((cmd.migration_id, "target"))
        if job is None:
            if self._running(wid):
                meta = self.runner.meta.get(wid, {})
                if meta.get("migration") != cmd.migration_id:
                    raise RuntimeError(f"workload {wid} already runs on this node")
            else:
                from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV, write_secret_file
                secret = self._secret(cmd)
                spec = types_pb2.Workload()
                spec.CopyFrom(cmd.workload)
                self.runner.forget(wid)
                host = self._listen_host()
                spec.env[RESTORE_ENV] = f"receive:{cmd.session}@{'[' + host + ']' if ':' in host else host}:0"
                spec.env[HOLD_ENV] = "1"
                # the file's path goes in the environment, never the secret (the spec is reported back)
                spec.env[SECRET_FILE_ENV] = write_secret_file(self.runner.path(wid, "transfer-secret"), secret)
                w = await asyncio.to_thread(self.runner.start, spec)
                self.runner.meta.setdefault(wid, {})["migration"] = cmd.migration_id
                self.runner.save(wid)
                self.runner.report([w])
                if w.state != types_pb2.WORKLOAD_STATE_RUNNING:
                    raise RuntimeError(f"the target process did not start: {w.message}")
            job = self.jobs[(cmd.migration_id, "target")] = Job(cmd.migration_id, wid)
        if not job.address:
            port = await asyncio.to_thread(self._wait_listening, wid)
            job.address = f"{self._dial_host()}:{port}"
        report(R.TARGET_LISTENING, address=job.address)

    def _wait_listening(self, wid: str) -> int:
        deadline = time.monotonic() + TARGET_LISTEN_TIMEOUT
        sock = self._socket(wid)
        while True:
            if not self._running(wid):
                raise RuntimeError(f"the target process of {wid} ended before it listened")
            try:
                with AgentLink(sock, timeout=5) as link:
                    st = link.call("status")
                if st.get("receive_address"):
                    return int(st["receive_address"].rsplit(":", 1)[1])
                if st.get("restored"):
                    raise RuntimeError("the target restored already (no longer receiving)")
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the target process of {wid} did not listen within {TARGET_LISTEN_TIMEOUT:g} s")
            time.sleep(0.05)

    async def _send_state(self, cmd: M.MigrationCommand, report) -> None:
        key = (cmd.migration_id, "source")
        job = self.jobs.get(key)
        if job is not None:
            if job.done and job.final is not None:
                self._send(job.final)
            return
        if not self._running(cmd.workload_id):
            raise RuntimeError(f"workload {cmd.workload_id} does not run on {self.agent.node}")
        self._secret(cmd)
        job = self.jobs[key] = Job(cmd.migration_id, cmd.workload_id)
        run = self._run_send_transparent if cmd.mode == M.MIGRATION_MODE_TRANSPARENT else self._run_send
        job.thread = threading.Thread(target=run, args=(job, cmd, report), daemon=True,
                                      name=f"migrate-{cmd.migration_id}")
        job.thread.start()

    def _run_send(self, job: Job, cmd: M.MigrationCommand, report) -> None:
        from mesh.checkpoint.precopy import MigrationFailed, PrecopyMigration, PrecopyPolicy
        policy = PrecopyPolicy(max_rounds=cmd.max_rounds or 8, stop_bytes=cmd.stop_bytes or (16 << 20))
        link = AgentLink(self._socket(cmd.workload_id))
        src = _SourceLink(link, job, report)
        m = PrecopyMigration(src, _RemoteTarget(cmd.address, cmd.session, job), secret=self._secret(cmd),
                             policy=policy, stop_source=False,
                             progress=lambda msg: log(logger, logging.INFO, "migration", migration=job.migration_id,
                                                      step=msg))
        try:
            res = m._migrate(precopy=cmd.mode != M.MIGRATION_MODE_STOP_AND_COPY)
            job.final = M.MigrationReport(
                migration_id=job.migration_id, event=R.RESTORED, step=res.step, bytes=res.bytes_sent,
                state_bytes=res.state_bytes, downtime_ms=res.downtime_ms, total_ms=res.total_ms,
                mb_per_s=res.bytes_sent / 1e6 / max(res.total_ms / 1e3, 1e-9), transfer=res.transport)
        except (MigrationFailed, Cancelled, OSError, ConnectionError) as e:
            job.final = M.MigrationReport(migration_id=job.migration_id, event=R.FAILED, message=str(e))
        finally:
            link.close()
            job.done = True
        log(logger, logging.INFO, "migration send finished", node=self.agent.node, migration=job.migration_id,
            result=R.Event.Name(job.final.event), message=job.final.message)
        self._send(job.final)

    async def _push_checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        key = (cmd.migration_id, "push")
        job = self.jobs.get(key)
        if job is not None:
            if job.done and job.final is not None:
                self._send(job.final)
            return
        tjob = self.jobs.get((cmd.migration_id, "target"))
        if tjob is None or not tjob.address:
            raise RuntimeError("the target is not listening here (START_TARGET first)")
        secret = self._secret(cmd)
        job = self.jobs[key] = Job(cmd.migration_id, cmd.workload_id)
        path, tenant = self._store_path(cmd.path), cmd.tenant

        def push() -> None:
            from mesh.checkpoint.store import push_checkpoint
            from mesh.checkpoint.transfer import TransferClient
            try:
                with TransferClient(tjob.address, cmd.session, secret=secret) as client:
                    stats = push_checkpoint(path, client, self._key(tenant), tenant=tenant,
                                            checkpoint_id=os.path.basename(path),
                                            checkpoint_key=cmd.checkpoint_key or None)
                job.final = M.MigrationReport(migration_id=job.migration_id, event=R.RESTORED,
                                              step=int(stats.committed.get("step", 0)), bytes=stats.bytes,
                                              mb_per_s=stats.mb_per_s, total_ms=stats.seconds * 1e3)
            except Exception as e:   # noqa: BLE001
                job.final = M.MigrationReport(migration_id=job.migration_id, event=R.FAILED,
                                              message=f"restore from {path}: {e}")
            job.done = True
            self._send(job.final)
        job.thread = threading.Thread(target=push, daemon=True, name=f"restore-{cmd.migration_id}")
        job.thread.start()

    def _drop_secret_file(self, wid: str) -> None:
        """The receiving workload removes its secret file once read; a target that never read it (it died,
        or was stopped first) must not leave it behind."""
        from nodeagent.workloads import SECRET_FILE_NAME
        for path in (self.runner.path(wid, "transfer-secret"), os.path.join(self.runner.path(wid, "d"), SECRET_FILE_NAME)):
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _resume_target(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.alias if cmd.alias and cmd.alias in self.runner.workloads else cmd.workload_id
        self._release_target_job(cmd.migration_id)
        self._drop_secret_file(wid)
        if self._running(wid) and await asyncio.to_thread(self._continue_restored, wid):
            step = 0
        elif self._running(wid):
            def resume() -> dict:
                with AgentLink(self._socket(wid), timeout=30) as link:
                    return link.call("resume")
            r = await asyncio.to_thread(resume)
            step = int(r.get("step", 0))
        else:
            w = self.runner.workloads.get(wid)
            if w is None:
                raise RuntimeError(f"workload {wid} is not on {self.agent.node}")
            step = 0                    # it ran and ended already: resumed before
        meta = self.runner.meta.get(wid, {})
        if meta.pop("migration", None) is not None:
            self.runner.save(wid)
        if wid == cmd.workload_id:
            self.runner.report([self.runner.workloads[wid]])     # its pid, now that the record names it
        report(R.TARGET_RESUMED, step=step)

    async def _stop_source(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.workload_id
        job = self.jobs.get((cmd.migration_id, "source"))
        if job is not None and job.thread is not None and job.thread.is_alive():
            await asyncio.to_thread(job.thread.join, 60)
        if cmd.alias:
            wid = self._hand_over(cmd.workload_id, cmd.alias)
        if await self._stop_transparent(wid, cmd.migration_id):
            report(R.SOURCE_STOPPED)
            return
        if self._running(wid) and self.runner.meta.get(wid, {}).get("migration") != cmd.migration_id:
            meta = self.runner.meta.setdefault(wid, {})
            if not meta.get("stop_at"):
                meta["stop_at"] = time.time()
                meta["stop_reason"] = f"migrated ({cmd.migration_id})"
                self.runner.save(wid)

            def stop() -> None:
                try:
                    with AgentLink(self._socket(wid), timeout=10) as link:
                        link.call("stop")
                except (OSError, ConnectionError):
                    pass
            await asyncio.to_thread(stop)
            deadline = time.monotonic() + 10
            while self._running(wid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                self.runner.check_all()
            if self._running(wid):
                meta["stop_at"] = 0
                self.runner.stop(wid)    # the SDK did not answer: SIGTERM, SIGKILL after the grace period
        report(R.SOURCE_STOPPED)

    async def _abort_source(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.workload_id
        job = self.jobs.get((cmd.migration_id, "source"))
        if job is not None:
            job.cancelled = True
            if job.thread is not None and job.thread.is_alive():
                await asyncio.to_thread(job.thread.join, 120)
        if await self._abort_transparent(wid):
            report(R.SOURCE_RESUMED)
            return
        if self._running(wid):
            def abort() -> None:
                with AgentLink(self._socket(wid), timeout=30) as link:
                    link.call("precopy_abort")
                    link.call("resume")
            try:
                await asyncio.to_thread(abort)
            except (OSError, ConnectionError) as e:
                log(logger, logging.WARNING, "cannot resume the source", workload=wid, error=str(e))
        report(R.SOURCE_RESUMED)

    async def _stop_target(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.alias or cmd.workload_id
        job = self.jobs.get((cmd.migration_id, "push"))
        if job is not None:
            job.cancelled = True
        self._release_target_job(cmd.migration_id)
        self._drop_secret_file(wid)
        if self._running(wid) and self.runner.meta.get(wid, {}).get("migration") == cmd.migration_id:
            self._kill_restored(wid)
            self.runner.stop(wid)
            deadline = time.monotonic() + self.runner.stop_grace + 5
            while self._running(wid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                self.runner.check_all()
            if self._running(wid):
                raise RuntimeError(f"the target process of {wid} has not ended yet")
        report(R.TARGET_STOPPED)

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
            os.makedirs(os.path.dirname(path), exist_ok=True)
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


def install(agents, cfg) -> None:
    """One MigrationAgent per agent, on its workload runner."""
    tls = None
    if not getattr(cfg, "insecure", True) and getattr(cfg, "tls_cert", ""):
        tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    for a in agents:
        runner = getattr(a, "workload_runner", None)
        if runner is not None:
            MigrationAgent(a, runner, getattr(cfg, "checkpoint_dir", ""), getattr(cfg, "checkpoint_keys_file", ""),
                           getattr(cfg, "transfer_host", ""), tls).install()
