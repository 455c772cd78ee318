"""The target agent's migration steps: START_TARGET starts the workload (same ID) on the target slice,
receiving and holding (`GPUMESH_RESTORE_FROM=receive:SESSION@HOST:0`, `GPUMESH_RESTORE_HOLD=1`, the migration's
secret in a 0600 file named by `GPUMESH_TRANSFER_SECRET_FILE`), and answers with the address it listens on;
PUSH_CHECKPOINT sends a stored checkpoint to it (restore; a repeat while it pushes is answered with the bytes sent so
far: PROGRESS); RESUME_TARGET lets it run once the commit is durable;
STOP_TARGET stops it (rollback). Transparent mode's targets are in nodeagent/migrate_slices.py.

Mixed into `MigrationAgent` (nodeagent/migrate.py) on `MigrationBase` (nodeagent/migrate_base.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import netmode
from mesh.checkpoint.agent_link import HOLD_ENV, RESTORE_ENV
from nodeagent.isolation.plan import INSIDE_WORKDIR
from nodeagent.migrate_base import Job, MigrationBase

R = M.MigrationReport
TARGET_LISTEN_TIMEOUT = 90.0
START_SETTLE_TIMEOUT = 15.0     # STOP_TARGET waits this long for a start in flight (its supervisor's launch)


class TargetSteps(MigrationBase):
    """START_TARGET, PUSH_CHECKPOINT, RESUME_TARGET and STOP_TARGET (see the module's docstring)."""

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
                meta = {"migration": cmd.migration_id}
                if self._will_have_no_network(spec):
                    # its own loopback only: it listens on a Unix socket in its /tmp, the agent relays to it
                    meta["receive_socket"] = f".gpumesh-recv-{uuid.uuid4().hex[:12]}.sock"
                    spec.env[RESTORE_ENV] = f"receive:{cmd.session}@unix:{INSIDE_WORKDIR}/{meta['receive_socket']}"
                spec.env[HOLD_ENV] = "1"
                # the file's path goes to the runner, never the secret (the spec is reported back); it
                # names the file in the workload's environment, never taking the spec's own value of it
                spec.env.pop(SECRET_FILE_ENV, None)
                secret_file = write_secret_file(self.runner.path(wid, "transfer-secret"), secret)
                # the migration's mark is in the record before the process exists (crash-safe)
                w = await asyncio.to_thread(self.runner.start, spec, meta=meta, secret_file=secret_file)
                self.runner.report([w])
                if w.state != types_pb2.WORKLOAD_STATE_RUNNING:
                    raise RuntimeError(f"the target process did not start: {w.message}")
            job = self.jobs[(cmd.migration_id, "target")] = Job(cmd.migration_id, wid)
        if not job.address:
            port = await asyncio.to_thread(self._wait_listening, wid)
            if port == 0:       # a target without network listens on its Unix socket: a TCP port leads there
                job.relay = await asyncio.to_thread(self._inbound, wid)
                port = int(job.relay.address.rsplit(":", 1)[1])
            job.address = f"{self._dial_host()}:{port}"
        report(R.TARGET_LISTENING, address=job.address)

    def _wait_listening(self, wid: str) -> int:
        deadline = time.monotonic() + TARGET_LISTEN_TIMEOUT
        while True:
            if not self._running(wid):
                raise RuntimeError(f"the target process of {wid} ended before it listened")
            try:
                with self._link(wid, timeout=5) as link:
                    st = link.call("status")
                if st.get("receive_address"):
                    if st["receive_address"].startswith("unix:"):
                        return 0            # the relay to it is made by the caller
                    return int(st["receive_address"].rsplit(":", 1)[1])
                if st.get("restored"):
                    raise RuntimeError("the target restored already (no longer receiving)")
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the target process of {wid} did not listen within {TARGET_LISTEN_TIMEOUT:g} s")
            time.sleep(0.05)

    def _will_have_no_network(self, spec: types_pb2.Workload) -> bool:
        """The workload `spec` will run in a network namespace of its own (`none` or `isolated`: the
        isolator's decision), so it receives on a Unix socket."""
        iso = getattr(self.runner, "isolator", None)
        if iso is None:
            return False
        try:
            return iso.network(spec, self.agent.desired.get(spec.slice_id)) in netmode.OWN_NAMESPACE
        except Exception:   # noqa: BLE001 - a refused label: the start refuses it with the reason
            return False

    def _inbound(self, wid: str):
        """The TCP relay to a receiving target without network (nodeagent/isolation/netrelay.py)."""
        from nodeagent.isolation import netrelay
        meta = self.runner.meta.get(wid, {})
        name = meta.get("receive_socket")
        if not name or "uid" not in meta:
            raise RuntimeError(f"the target {wid} listens on a Unix socket this agent did not give it")
        return netrelay.inbound(self._listen_host(), self.runner.path(wid, "d"), name, int(meta["uid"]))

    async def _push_checkpoint(self, cmd: M.MigrationCommand, report) -> None:
        key = (cmd.migration_id, "push")
        if self._asked_again(key):
            return
        tjob = self.jobs.get((cmd.migration_id, "target"))
        if tjob is None or not tjob.address:
            raise RuntimeError("the target is not listening here (START_TARGET first)")
        secret = self._secret(cmd)
        job = self.jobs[key] = Job(cmd.migration_id, cmd.workload_id)
        job.live = lambda: job.bytes_sent          # answered to the control plane's repeats while it pushes
        path, tenant = self._store_path(cmd.path), cmd.tenant

        def pushed(sent: int, total: int, seconds: float) -> None:
            job.bytes_sent = sent

        def push() -> None:
            from mesh.checkpoint.store import push_checkpoint
            from mesh.checkpoint.transfer import TransferClient
            try:
                # the gRPC stream only (mesh="grpc"): the ring a restoring workload offers is its own shared-memory
                # segment, and the agent copying into it through a mapping is killed with SIGBUS when the tenant
                # shrinks the segment during the copy (where it lies in the host's /dev/shm: isolation=criu)
                with TransferClient(tjob.address, cmd.session, secret=secret, mesh="grpc", progress=pushed) as client:
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

    def _starting(self, wid: str, mid: str) -> bool:
        """`wid`'s start for migration `mid` is in flight: its record is PENDING, marked with `mid` (or not yet
        marked: the runner writes the marks just before it launches the supervisor)."""
        w = self.runner.workloads.get(wid)
        return w is not None and w.state == types_pb2.WORKLOAD_STATE_PENDING and \
            self.runner.meta.get(wid, {}).get("migration", mid) == mid

    def _drop_secret_file(self, wid: str) -> None:
        """The receiving workload removes its secret file once read; a target that never read it (it died,
        or was stopped first) must not leave it behind."""
        from nodeagent.workload_confine import SECRET_FILE_NAME
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
                with self._link(wid, timeout=30) as link:
                    return link.call("resume")
            r = await asyncio.to_thread(resume)
            step = int(r.get("step", 0))
        else:
            w = self.runner.workloads.get(wid)
            if w is None:
                raise RuntimeError(f"workload {wid} is not on {self.agent.node}")
            if self.runner.meta.get(wid, {}).get("migration") == cmd.migration_id:
                # never resumed (a resume clears the mark below) and not running: it was stopped or died
                # while holding. Never answer resumed for a target that does not run.
                raise RuntimeError(f"the target {wid} of migration {cmd.migration_id} is not running "
                                   f"({types_pb2.WorkloadState.Name(w.state)}: {w.message or 'no message'})")
            step = 0                    # it ran (resumed by an earlier RESUME_TARGET) and ended already
        meta = self.runner.meta.get(wid, {})
        if meta.pop("migration", None) is not None:
            self.runner.save(wid)
        if wid == cmd.workload_id:
            self.runner.report([self.runner.workloads[wid]])     # its pid, now that the record names it
        report(R.TARGET_RESUMED, step=step)

    async def _stop_target(self, cmd: M.MigrationCommand, report) -> None:
        wid = cmd.alias or cmd.workload_id
        job = self.jobs.get((cmd.migration_id, "push"))
        if job is not None:
            job.cancelled = True
        self._release_target_job(cmd.migration_id)
        # a transparent target is started in the transfer server's thread, beside this loop: one whose start
        # is in flight (PENDING) is waited for, so what it starts is stopped here, not left running
        deadline = time.monotonic() + START_SETTLE_TIMEOUT
        while self._starting(wid, cmd.migration_id):
            if time.monotonic() > deadline:     # never answered stopped while it may still start: asked again
                raise RuntimeError(f"the target {wid} is still being started: not stopped yet")
            await asyncio.sleep(0.05)
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
