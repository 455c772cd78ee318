"""The source agent's migration steps: SEND runs the pre-copy (or stop-and-copy) transfer from the workload's
control socket to the target's address without stopping the source, and ends with the source paused at a safe
point and the target restored and holding; STOP_SOURCE stops the source after the commit; ABORT_SOURCE cancels
a send and resumes the source (rollback). Transparent mode's sends are in nodeagent/migrate_slices.py.

Mixed into `MigrationAgent` (nodeagent/migrate.py) on `MigrationBase` (nodeagent/migrate_base.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from gpumesh.v1 import migration_service_pb2 as M
from mesh.checkpoint.agent_link import AgentLink
from mesh.logs import log
from nodeagent.migrate_base import Cancelled, Job, MigrationBase

logger = logging.getLogger("nodeagent.migrate")
R = M.MigrationReport
# One call of the pre-copy send may stream the whole state (round 0, or `final` of a stop-and-copy): 80 GB
# at 1 Gb/s is 11 minutes. Longer than any such call, yet a silent SDK no longer holds the thread forever.
SEND_CALL_TIMEOUT = 3600.0


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


class SourceSteps(MigrationBase):
    """SEND, STOP_SOURCE and ABORT_SOURCE (see the module's docstring)."""

    async def _send_state(self, cmd: M.MigrationCommand, report) -> None:
        key = (cmd.migration_id, "source")
        if self._asked_again(key):
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
        link = self._link(cmd.workload_id, timeout=SEND_CALL_TIMEOUT)
        src = _SourceLink(link, job, report)
        try:
            relay = self._outbound(cmd.workload_id, cmd.address)    # a source without network: through its /tmp
        except OSError as e:
            link.close()
            job.final = M.MigrationReport(migration_id=job.migration_id, event=R.FAILED,
                                          message=f"cannot relay the source's transfer: {e}")
            job.done = True
            return self._send(job.final)
        m = PrecopyMigration(src, _RemoteTarget(relay.address if relay else cmd.address, cmd.session, job),
                             secret=self._secret(cmd),
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
        except (ValueError, TypeError) as e:
            # the figures are the workload's SDK's (the tenant's code): one no report can carry (past int64) must
            # end the send with an answer, not kill this thread without one
            job.final = M.MigrationReport(migration_id=job.migration_id, event=R.FAILED,
                                          message=f"the workload's checkpoint SDK answered a figure no report can "
                                                  f"carry: {e}")
        finally:
            link.close()
            if relay is not None:
                relay.stop()
            job.done = True
        log(logger, logging.INFO, "migration send finished", node=self.agent.node, migration=job.migration_id,
            result=R.Event.Name(job.final.event), message=job.final.message)
        self._send(job.final)

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
                    with self._link(wid, timeout=10) as link:
                        link.call("stop")
                except (OSError, ConnectionError):
                    pass
            await asyncio.to_thread(stop)
            deadline = time.monotonic() + 10
            while self._running(wid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                self.runner.check_all()
            if self._running(wid):
                # the SDK did not answer: SIGTERM, SIGKILL after the grace period. A stop grace under the wait
                # may have had the runner kill it already: that mark goes with the old grace, or the new one's
                # SIGKILL is never sent (the runner sends it once per mark; the mark is in the record)
                prior = {k: meta.pop(k) for k in ("stop_at", "killed") if k in meta}
                self.runner.stop(wid)
                if not meta.get("stop_at"):     # it ended meanwhile: the stop it had stands (how it ended)
                    meta.update(prior)
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
        if self._running(wid) and os.path.exists(self._socket(wid)):
            # (no SDK socket: a process without the SDK, e.g. a model server before its dump, was never paused)
            def abort() -> None:
                with self._link(wid, timeout=30) as link:
                    link.call("precopy_abort")
                    link.call("resume")
            try:
                await asyncio.to_thread(abort)
            except (OSError, ConnectionError) as e:
                # still paused: FAILED (not SOURCE_RESUMED), so the control plane asks again and the
                # migration stays ROLLING_BACK until the source really runs on
                log(logger, logging.WARNING, "cannot resume the source", workload=wid, error=str(e))
                raise RuntimeError(f"the source {wid} did not resume: {e}") from e
        report(R.SOURCE_RESUMED)
