"""The agent's migration steps for same-node migrations, resizes and transparent mode (mixed
into nodeagent.migrate.MigrationAgent).

* A same-node migration runs the target process under the runner key `<workload>~<migration>`;
  after the commit the target takes the workload's ID and the source's record moves aside
  (`_hand_over`), so the source's end is never reported as the workload's.
* SWAP_SLICES (a resize's commit) renames this node's realized slices so each new record names
  the instance at its placement; idempotent, and a full reconcile (adopt by placement) after an
  agent restart reaches the same state. A record being released (the old placement, released after
  the swap; the swap asked again by a restarted control plane) is never realized again: renamed when
  its instance is still here, else reported released.
* Transparent mode (CRIU, stop-and-copy; docs/checkpointing.md): refused with the reason where
  CRIU is unusable (missing, older than 4.0, `criu check` failing). Else the source dumps the
  workload process (not its shim; `--shell-job`, the process is killed) into
  `<runner dir>/<id>.criu-<migration>` and marks its record `frozen` (the runner leaves it
  alone), ships the images and its log over the transfer channel to the target, whose
  ImageSink restores them on commit under a new shim (`--restore-pidfile`: the shim is a child
  subreaper and follows the restored process), left stopped until RESUME_TARGET (SIGCONT).
  Its stdout/stderr become the target's log (`--inherit-fd`). Rollback before the commit:
  SIGKILL to the stopped target, `criu restore` from the source's images on the source.
  CRIU restores the same PIDs: they must be free on the target.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.fsmodes import copy_private
from mesh.logs import log
from nodeagent.migrate_base import Job

logger = logging.getLogger("nodeagent.migrate")
R = M.MigrationReport
RESTORE_TIMEOUT = 300.0
PROBE_TIMEOUT = 10.0      # seconds the SDK probe (CHECK_SDK) waits for the workload's status answer


class SlicesMixin:
    """Needs self.agent, self.runner, self.outbox."""

    # -- same-node migrations and resizes ------------------------------------------------

    def _hand_over(self, wid: str, alias: str) -> str:
        """A same-node migration after its commit: the target process (runner key `alias`) takes
        the workload's ID, the source's record moves to `alias~source` (its end is reported under
        that name, which the control plane does not know). Synchronous: no report in between.
        Returns the source's key."""
        old = f"{alias}~source"
        r = self.runner
        if alias in r.workloads:
            r.meta[alias]["hand_over_to"] = wid     # durable intent: a restarted runner finishes it (load)
            r.save(alias)
            r.finish_hand_over(alias)
            log(logger, logging.INFO, "target process took over the workload ID", node=self.agent.node,
                workload=wid, source_key=old)
        return old

    async def _swap_slices(self, cmd: M.MigrationCommand, report) -> None:
        """Rename realized slices so each record in `cmd.slices` on this node names the instance at
        its placement (a resize's swap). Idempotent: a second call finds every name in place."""
        agent, slicer = self.agent, self.agent.slicer
        ids = [s.id for s in cmd.slices]
        mine = [s for s in cmd.slices if s.node == agent.node]

        def holds(key: str, s: types_pb2.Slice) -> bool:
            inst = slicer.mig.get(key)
            if inst is not None:
                return (inst.gpu_index, inst.profile, inst.start) == (s.gpu_index, s.profile, s.placement.start)
            x = slicer.shared.get(key)
            return x is not None and (x.gpu_index, x.isolation, x.memory_bytes) == (
                s.gpu_index, s.isolation, s.memory_bytes)
        moves, released = {}, []
        for s in mine:
            src = next((k for k in ([s.id] + ids) if k not in moves.values() and holds(k, s)), None)
            if src is None and s.state == types_pb2.SLICE_STATE_RELEASING:
                # the old placement, released after the swap and torn down here already: the swap is asked again
                # (a restarted control plane finishing the resize); its release is answered, it is never realized
                released.append(s.id)
                continue
            if src is None and s.isolation != types_pb2.ISOLATION_MIG:
                src = s.id      # shared slices are bookkeeping (lost with an agent restart): realized anew
            if src is None:
                raise RuntimeError(f"no realized slice here is at the placement of {s.id} "
                                   f"(GPU {s.gpu_index} {s.profile or s.memory_bytes})")
            moves[s.id] = src
        mig = {k: slicer.mig.pop(k) for k in moves.values() if k in slicer.mig}
        for k in moves.values():
            slicer.shared.pop(k, None)
        for k in ids:
            if k not in moves:          # its placement is on another node now
                agent.realized.pop(k, None)
                agent.desired.pop(k, None)
        statuses = []
        for s in mine:
            src = moves.get(s.id)
            if src is None:
                continue
            if src in mig:
                slicer.mig[s.id] = mig[src]
            elif s.state != types_pb2.SLICE_STATE_RELEASING:
                slicer.shared[s.id] = s
            if s.state == types_pb2.SLICE_STATE_RELEASING:
                # renamed (its removal tears down the instance at its placement), never realized or desired again
                agent.desired.pop(s.id, None)
                agent.realized.pop(s.id, None)
                continue
            agent.desired[s.id] = s
            agent.realized[s.id] = st = slicer.realize(s)
            statuses.append(st)
        if any(src != new for new, src in moves.items()):
            log(logger, logging.INFO, "slices swapped", node=agent.node, moves=moves)
        self._send_statuses(statuses, released)
        report(R.SLICES_SWAPPED)

    def _send_statuses(self, statuses: list, released: list = ()) -> None:
        if (statuses or released) and self.outbox is not None:
            self.outbox.put_nowait(node_service_pb2.AgentMessage(
                report=node_service_pb2.SliceStatusReport(statuses=statuses, released=released)))

    # -- transparent mode (CRIU) ---------------------------------------------------------

    def _require_transparent(self) -> None:
        from mesh.checkpoint.criu import Criu
        Criu().require()        # TransparentUnavailable: names criu, the version needed, how to get it

    def _criu(self, wid: str):
        """Criu for this workload: with its tenant's uid as CRIU's real uid (nodeagent/isolation/criu_ids.py)."""
        from mesh.checkpoint.criu import Criu
        meta = self.runner.meta.get(wid, {})
        if "uid" not in meta:
            return Criu()
        from nodeagent.isolation.criu_ids import runner_as
        c = Criu(runner=runner_as(int(meta["uid"]), int(meta["gid"])))
        c._info = Criu().detect()       # `criu check` itself runs as root (it reads root-only /proc/sys files)
        return c

    async def _check_transparent(self, cmd: M.MigrationCommand, report) -> None:
        await asyncio.to_thread(self._require_transparent)
        namespaces = self.runner.meta.get(cmd.workload_id, {}).get("namespaces")
        if namespaces:
            from mesh.checkpoint.criu import TransparentUnavailable
            raise TransparentUnavailable(
                f"workload {cmd.workload_id} runs in its own {'/'.join(namespaces)} namespaces with a private /dev, "
                "which CRIU does not dump and restore here: start it with the label gpumesh.io/isolation=criu "
                "to make it transparently migratable (docs/operations.md, Workload isolation)")
        report(R.TRANSPARENT_OK)

    async def _check_sdk(self, cmd: M.MigrationCommand, report) -> None:
        """Whether the workload's checkpoint SDK answers a status on its control socket (only the workload's
        own, `_link`): NoControlSocket says in words that it does not use mesh.checkpoint."""
        if not self._running(cmd.workload_id):
            raise RuntimeError(f"workload {cmd.workload_id} is not running on {self.agent.node}")
        link = self._link(cmd.workload_id, timeout=PROBE_TIMEOUT)
        try:
            await asyncio.to_thread(link.call, "status")
        finally:
            link.close()
        report(R.SDK_OK)

    def _images_dir(self, wid: str, mid: str) -> str:
        return os.path.realpath(self.runner.path(wid, f"criu-{mid}"))

    def _wait_adopted(self, wid: str, images: str, timeout: float = RESTORE_TIMEOUT) -> int:
        """The pid of the process the shim adopted, once `criu restore` is done; raises with the
        reason when the restore failed."""
        from mesh.checkpoint.criu import CriuFailed, _log_tail
        from nodeagent.workloads import _read_json
        deadline = time.monotonic() + timeout
        while True:
            doc = _read_json(self.runner.path(wid, "pid"))
            if doc and doc.get("pid"):
                return int(doc["pid"])
            ex = _read_json(self.runner.path(wid, "exit"))
            if ex is not None:
                raise CriuFailed(ex.get("error") or "criu restore failed", _log_tail(Path(images) / "restore.log"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"criu restore of {wid} did not finish within {timeout:g} s")
            time.sleep(0.05)

    def _restore_argv(self, images: str, log_key: str, leave_stopped: bool) -> tuple[list[str], str]:
        from mesh.checkpoint.criu import Criu
        pidfile = os.path.join(images, "restored.pid")
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        return Criu().restore_argv(Path(images), Path(pidfile), shell_job=True, tcp_established=False,
                                   leave_stopped=leave_stopped, inherit={"fd[{logfd}]": log_key}), pidfile

    # the target

    async def _start_target_transparent(self, cmd: M.MigrationCommand, report) -> None:
        from mesh.checkpoint.criu import ImageSink
        from mesh.checkpoint.transfer import TransferServer
        wid, mid = cmd.workload.id, cmd.migration_id
        if cmd.alias:
            raise RuntimeError("transparent migration moves a workload to another node (CRIU restores its PIDs, "
                               "which the source holds on its own node)")
        await asyncio.to_thread(self._require_transparent)
        job = self.jobs.get((mid, "target"))
        if job is None:
            if self._running(wid) and self.runner.meta.get(wid, {}).get("migration") != mid:
                raise RuntimeError(f"workload {wid} already runs on this node")
            spec = types_pb2.Workload()
            spec.CopyFrom(cmd.workload)
            images = self._images_dir(wid, mid)
            secret = self._secret(cmd)
            host = self._listen_host()
            # the agent's configured address (never every interface by default), mTLS with the agents'
            # certificates when secured; the source must prove the migration's secret either way
            server = TransferServer(f"[{host}]:0" if ":" in host else f"{host}:0",
                                    credentials=self._server_credentials(),
                                    idle_timeout_s=self.transfer_idle_timeout).start()
            server.expect(cmd.session, ImageSink(images, lambda d, extras: self._restore_target(spec, mid, d, extras)),
                          secret=secret, peer=cmd.peer if self.tls is not None else "")
            job = self.jobs[(mid, "target")] = Job(mid, wid)
            job.server, job.images = server, images
            job.address = f"{self._dial_host()}:{server.address.rsplit(':', 1)[1]}"
        report(R.TARGET_LISTENING, address=job.address)

    def _restore_target(self, spec: types_pb2.Workload, mid: str, images: Path, extras: dict) -> dict:
        """The images arrived whole (the transfer's commit, in a server thread): restore them under a
        new shim, left stopped (the commit point is still ahead), and answer the pid."""
        from mesh.checkpoint.criu import LOG_ENTRY
        wid, r = spec.id, self.runner
        if self._running(wid):
            if r.meta.get(wid, {}).get("migration") == mid and r.workloads[wid].pid:
                return {"pid": r.workloads[wid].pid, "step": 0}
            raise RuntimeError(f"workload {wid} already runs on this node")
        if self._target_released(mid):
            raise RuntimeError(f"migration {mid} was rolled back on this node: its images are not restored")
        if extras.get("cwd"):
            self._make_cwd(spec, extras)
        r.forget(wid)
        copy_private(images / LOG_ENTRY, r.path(wid, "log"))     # the log so far (0600); the process appends
        argv, pidfile = self._restore_argv(str(images), str(extras["log_key"]), leave_stopped=True)
        w = r.start(spec, restore=(argv, pidfile), restore_uid=int(extras.get("uid", -1)),
                    meta={"migration": mid, "criu_hold": True})      # in the record before the shim exists
        if w.state != types_pb2.WORKLOAD_STATE_RUNNING:
            raise RuntimeError(f"the restoring shim did not start: {w.message}")
        pid = self._wait_adopted(wid, str(images))
        log(logger, logging.INFO, "workload restored by CRIU (held stopped until the commit)", node=self.agent.node,
            workload=wid, pid=pid, migration=mid)
        return {"pid": pid, "step": 0}

    def _make_cwd(self, spec: types_pb2.Workload, extras: dict) -> None:
        """CRIU restores the working directory by path, as the tenant's uid: it is made first, by the path it had
        on the source (under another state directory when this host keeps its state elsewhere); the workload's
        own directory there (`workdir`, or this runner's for an older source) the tenant's, as a fresh start
        makes it (nodeagent/isolation/workdir.py)."""
        r = self.runner
        if r.isolator is None:          # unconfined: the workload runs as the agent's user
            os.makedirs(extras["cwd"], exist_ok=True)
            return
        from nodeagent.isolation.users import IdentityError
        from nodeagent.isolation.workdir import restore_cwd
        try:
            ident = r.isolator.users.identity(spec.tenant)
        except IdentityError as e:
            raise RuntimeError(f"isolation: {e}") from None
        restore_cwd(extras["cwd"], extras.get("workdir") or r.path(spec.id, "d"), ident.uid, ident.gid)

    def _target_released(self, mid: str) -> bool:
        """The target job of `mid` is gone or released (STOP_TARGET, or an agent restart): nothing of it may
        start here any more (a commit's restore runs in the transfer server's thread, beside the loop)."""
        job = self.jobs.get((mid, "target"))
        return job is None or job.server is None

    def _release_target_job(self, mid: str) -> None:
        """After the hand-over or a rollback: the image receiver and the images go (and the relay of a
        cooperative target without network)."""
        job = self.jobs.get((mid, "target"))
        if job is not None and job.relay is not None:     # a target without network: its inbound relay
            job.relay.stop()
            job.relay = None
        server = getattr(job, "server", None)
        if server is not None:
            job.server = None
            server.stop(0)
        if job is not None and job.images:
            shutil.rmtree(job.images, ignore_errors=True)
            job.images = ""

    def _continue_restored(self, wid: str) -> bool:
        """RESUME_TARGET of a CRIU-restored target: SIGCONT (and its device state back). False when
        the target is not one."""
        meta = self.runner.meta.get(wid, {})
        if not meta.pop("criu_hold", None):
            return False
        pid = self.runner.workloads[wid].pid
        for target, send in ((meta.get("shim_pid"), os.killpg), (pid, os.kill)):
            if target:
                try:
                    send(target, signal.SIGCONT)
                except (ProcessLookupError, PermissionError):
                    pass
        self.runner.save(wid)
        if pid:
            self._criu(wid).resume_device(pid)
        return True

    def _kill_restored(self, wid: str) -> None:
        """STOP_TARGET of a CRIU-restored target (stopped, never ran): SIGKILL at once."""
        if self.runner.meta.get(wid, {}).get("criu_hold"):
            self.runner.stop(wid)
            self.runner._signal(wid, signal.SIGKILL)

    # the source

    def _run_send_transparent(self, job, cmd: M.MigrationCommand, report) -> None:
        from mesh.checkpoint.criu import LOG_ENTRY, image_entries, image_manifest, path_key
        from mesh.checkpoint.transfer import TransferClient
        r, wid, mid = self.runner, cmd.workload_id, cmd.migration_id
        t0 = time.perf_counter()
        try:
            w, meta = r.workloads[wid], r.meta[wid]
            images = self._images_dir(wid, mid)
            if meta.get("frozen") != mid:
                if not w.pid:
                    raise RuntimeError(f"workload {wid} has no process id yet")
                try:        # CRIU restores the working directory by path: the target makes it first
                    meta["criu_cwd"] = os.readlink(f"/proc/{w.pid}/cwd")
                except OSError:
                    meta["criu_cwd"] = os.path.realpath(r.dir)
                meta.update(frozen=mid, criu_images=images)
                r.save(wid)
                report(R.SOURCE_PAUSED, step=0)
                try:
                    self._criu(wid).dump(w.pid, images, shell_job=True)  # freezes, writes the images, kills it
                except Exception:
                    if os.path.exists(f"/proc/{w.pid}"):     # CRIU let it run on: nothing happened
                        meta.pop("frozen", None)
                        meta.pop("criu_images", None)
                        r.save(wid)
                        # what it wrote of the process's memory: no later step knows the directory now
                        shutil.rmtree(images, ignore_errors=True)
                    raise
                r._detach(wid)
                r.save(wid)
            if job.cancelled:
                raise RuntimeError(f"migration {mid} was rolled back")
            logfile = os.path.realpath(r.path(wid, "log"))
            entries = image_entries(images, {LOG_ENTRY: logfile})
            extras = {"transparent": "criu", "log_key": path_key(logfile), "cwd": meta.get("criu_cwd") or os.path.realpath(r.dir),
                      "workdir": os.path.realpath(r.path(wid, "d")), "pid": w.pid, "uid": meta.get("uid", -1)}
            with TransferClient(cmd.address, cmd.session, mesh="grpc", secret=self._secret(cmd),
                                credentials=self._channel_credentials(),
                                server_name=cmd.peer if self.tls is not None else "") as client:
                stats = client.send(entries, commit=lambda st: image_manifest(wid, entries, st, extras, client.algo))
            if not stats.committed or not stats.committed.get("pid"):
                raise RuntimeError("the target did not confirm the restore")
            ms = (time.perf_counter() - t0) * 1e3
            nbytes = sum(e.meta.nbytes for e in entries)
            job.final = R(migration_id=mid, event=R.RESTORED, step=0, bytes=stats.bytes, state_bytes=nbytes,
                          downtime_ms=ms, total_ms=ms, mb_per_s=stats.mb_per_s, transfer=stats.transport)
        except Exception as e:   # noqa: BLE001 - answered: the control plane rolls back
            job.final = R(migration_id=mid, event=R.FAILED, message=f"transparent send: {e}")
        finally:
            job.done = True
        log(logger, logging.INFO, "transparent migration send finished", node=self.agent.node, migration=mid,
            result=R.Event.Name(job.final.event), message=job.final.message)
        self._send(job.final)

    def _old_shim_gone(self, wid: str) -> None:
        """Wait (up to 30 s) for the dumped source's supervisor to end: its Popen, or after an agent
        restart (no Popen) its pid in /proc."""
        p = self.runner.popens.get(wid)
        if p is not None:
            try:
                p.wait(30)
            except Exception:   # noqa: BLE001
                pass
            return
        deadline = time.monotonic() + 30
        while self.runner.shim_running(wid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _restore_source(self, wid: str) -> None:
        """Rollback of a dumped source: restore it from its images here (same PIDs: they must be free,
        so the target's copy must be gone first; raises until it is, and the step is asked again)."""
        from mesh.checkpoint.criu import path_key
        r = self.runner
        w, meta = r.workloads[wid], r.meta[wid]
        images = meta["criu_images"]
        if w.pid and os.path.exists(f"/proc/{w.pid}"):
            raise RuntimeError(f"pid {w.pid} is still taken (the target's copy?): cannot restore the source yet")
        self._old_shim_gone(wid)
        for ext in ("pid", "exit"):
            try:
                os.unlink(r.path(wid, ext))
            except FileNotFoundError:
                pass
        logfile = os.path.realpath(r.path(wid, "log"))
        argv, pidfile = self._restore_argv(images, path_key(logfile), leave_stopped=False)
        spec = types_pb2.Workload()
        spec.CopyFrom(w)
        spec.pid = 0
        r.start(spec, restore=(argv, pidfile))      # keeps the record's stem (its files) itself
        pid = self._wait_adopted(wid, images)
        self._criu(wid).resume_device(pid)
        shutil.rmtree(images, ignore_errors=True)
        log(logger, logging.INFO, "source restored from its CRIU images (rollback)", node=self.agent.node,
            workload=wid, pid=pid)

    async def _abort_transparent(self, wid: str) -> bool:
        """ABORT_SOURCE where the source was dumped: restore it here. False when it was not."""
        meta = self.runner.meta.get(wid, {})
        if not meta.get("frozen"):
            return False
        pid = self.runner.workloads[wid].pid      # the supervisor and /proc, not a Popen: an agent restart
        if self.runner.shim_running(wid) and pid and os.path.exists(f"/proc/{pid}"):    # loses those
            meta.pop("frozen", None)        # the dump did not take it: it runs on
            meta.pop("criu_images", None)
            self.runner.save(wid)
            return True
        await asyncio.to_thread(self._restore_source, wid)
        self.runner.report([self.runner.workloads[wid]])
        return True

    async def _stop_transparent(self, wid: str, mid: str) -> bool:
        """STOP_SOURCE after the commit of a transparent migration: the dumped source ends as STOPPED
        and its images go. False when the source was not dumped."""
        r = self.runner
        meta = r.meta.get(wid, {})
        if meta.get("frozen") != mid:
            return False
        await asyncio.to_thread(self._old_shim_gone, wid)
        images = meta.pop("criu_images", "")
        meta.pop("frozen", None)
        meta["stop_at"] = meta.get("stop_at") or time.time()
        meta["stop_reason"] = f"migrated ({mid}, dumped by CRIU)"
        r.save(wid)
        r.check_all()
        if images:
            await asyncio.to_thread(shutil.rmtree, images, True)
        return True
