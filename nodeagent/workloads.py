"""The workload runner: processes started on this node's slices.

A workload runs under a small supervisor (`nodeagent/shim.py`) in a session
of its own, with the slice's environment (device UUID in CUDA_VISIBLE_DEVICES,
MPS limits) plus the workload's own, its output in
`<dir>/<id>.log`. Each workload's record (`<id>.json`), its process id
(`<id>.pid`, from the shim) and exit status (`<id>.exit`, from the shim) live
in the runner's directory, so a restarted agent re-adopts the workloads that
still run and learns how the others ended. Stop is SIGTERM to the process
group, then SIGKILL after the grace period.

On the simulated backend the process is registered with the simulated NVML on
the slice's device (and with the simulated MPS daemon on MPS slices), so NVML
sees it the way it sees a CUDA process on a real GPU: that is what makes IN_USE
real there. It is removed when the process ends.

Its records and files are in nodeagent/workload_records.py, its crash recovery in workload_recovery.py, the
process's registrations with the (simulated) NVML and the MPS daemon in workload_devices.py, the removal of
an ended workload's cgroup (a step per monitor pass, never a wait on the event loop) in workload_release.py.

Hooked into the agent through its extension points: ControllerMessage kinds
"workloads" (WorkloadCommand) and "logs" (LogRequest), and a Sync-open hook
that sends the full WorkloadStatusReport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from google.protobuf import timestamp_pb2

from gpumesh.v1 import node_service_pb2, types_pb2
from mesh.logs import log
from nodeagent.ids import BadId, check_id
from nodeagent.teardown import SliceTeardown
from nodeagent.workload_devices import DevicesMixin
from nodeagent.workload_records import RecordsMixin
from nodeagent.workload_recovery import RecoveryMixin
from nodeagent.workload_release import CgroupRelease
from nodeagent.workload_renewal import RENEW_BEFORE_SECONDS, CertificateRenewal
from nodeagent.telemetry import shared_slice_pids
from nodeagent.procfiles import _read_json, _shim_alive
from nodeagent.workload_confine import (agent_env_names, confinement_plan, environment_fd, hand_over_secret,
                                       plug_network, supervisor_environment)
from nodeagent.workload_logs import LogStreamer

logger = logging.getLogger(__name__)
W = types_pb2
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.py")
TERMINAL = (W.WORKLOAD_STATE_SUCCEEDED, W.WORKLOAD_STATE_FAILED, W.WORKLOAD_STATE_STOPPED)
LOG_CAP_INTERVAL = 1.0             # seconds between two checks of the running workloads' log sizes


def _ts(t: float | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if t is None:
        ts.GetCurrentTime()
    else:
        ts.FromNanoseconds(int(t * 1e9))
    return ts


class WorkloadRunner(RecordsMixin, RecoveryMixin, DevicesMixin):
    def __init__(self, agent, directory: str, *, mps=None, stop_grace: float = 10.0,
                 poll_interval: float = 0.2, isolator=None, log_max_bytes: int = 0,
                 renew_before: float = RENEW_BEFORE_SECONDS) -> None:
        self.agent = agent
        self.log_max_bytes = log_max_bytes  # a running workload's log is kept within it (0: unbounded)
        self.dir = directory
        self.isolator = isolator         # nodeagent.isolation.Isolator: confines every workload
        self.mps = mps
        self.stop_grace = stop_grace
        self.poll_interval = poll_interval
        self.workloads: dict[str, types_pb2.Workload] = {}
        self.meta: dict[str, dict] = {}              # id -> shim pid, device, stop request, ...
        self.save_lock = threading.Lock()            # records are saved from starts' threads and the event loop
        self.popens: dict[str, subprocess.Popen] = {}
        self.logs = LogStreamer(self)
        self.cgroups = CgroupRelease(isolator, getattr(agent, "node", ""))     # an ended workload's cgroup
        self.renewal = CertificateRenewal(self, renew_before)     # restarts in place: TLS renewal, a vLLM's share
        self.outbox: asyncio.Queue | None = None
        self.monitor: asyncio.Task | None = None
        os.makedirs(self.dir, mode=0o711, exist_ok=True)
        os.chmod(self.dir, 0o711)       # the workloads' own directories are inside; nothing else is readable
        self.load()

    def install(self) -> "WorkloadRunner":
        self.agent.workload_runner = self       # for nodeagent/migrate.py
        self.agent.handlers["workloads"] = self.on_command
        self.agent.handlers["logs"] = self.logs.on_logs
        self.agent.session_hooks.append(self.on_session)
        SliceTeardown(self).install()
        collector = getattr(self.agent, "collector", None)
        if collector is not None:
            collector.shared_slices = lambda: shared_slice_pids(self.workloads.values(), self.agent.desired)
        return self

    # -- reporting ----------------------------------------------------------------------

    def report(self, ws: list[types_pb2.Workload], full: bool = False) -> None:
        if self.outbox is None or (not ws and not full):
            return
        self.outbox.put_nowait(node_service_pb2.AgentMessage(
            workloads=node_service_pb2.WorkloadStatusReport(full=full, workloads=ws)))

    def on_session(self, outbox: asyncio.Queue) -> None:
        self.outbox = outbox
        self.check_all(report=False)
        self.report(list(self.workloads.values()), full=True)
        if self.monitor is None or self.monitor.done():
            self.monitor = asyncio.get_running_loop().create_task(self._monitor(), name=f"workloads-{self.agent.node}")

    # -- commands -----------------------------------------------------------------------

    async def on_command(self, cmd: node_service_pb2.WorkloadCommand, outbox: asyncio.Queue) -> None:
        self.outbox = outbox
        changed = []
        for w in cmd.start:
            if w.id in self.workloads:
                self.renewal.follow_share(w)    # a hand-started vLLM's new GPU memory share (a resized slice)
                continue
            if any(m.get("hand_over_to") == w.id or m.get("stem") == w.id for m in self.meta.values()):
                continue        # a same-node migration's target takes (or took) this ID: not lost (finish_hand_over)
            if w.HasField("started_at") or w.pid:     # it ran here once, but this agent has no record
                lost = types_pb2.Workload()
                lost.CopyFrom(w)
                lost.state = W.WORKLOAD_STATE_FAILED
                lost.message = "the agent has no record of this workload (its state directory was lost)"
                lost.finished_at.CopyFrom(_ts())
                changed.append(lost)
                continue
            changed.append(await asyncio.to_thread(self.start, w))
        if cmd.full:
            wanted = {w.id for w in cmd.start}
            for wid, w in list(self.workloads.items()):
                if w.state == W.WORKLOAD_STATE_RUNNING and wid not in wanted:
                    self.stop(wid)
        for wid in cmd.stop:
            self.stop(wid)
        for wid in cmd.forget:
            try:
                self.expire(check_id(wid, "forget"))
            except BadId as e:      # its files would be outside this runner's directory
                log(logger, logging.WARNING, "workload command refused", node=self.agent.node, error=str(e))
        self.report(changed)

    def start(self, spec: types_pb2.Workload, restore: tuple[list[str], str] | None = None,
              restore_uid: int = -1, meta: dict | None = None, secret_file: str = "") -> types_pb2.Workload:
        """Starts the workload's command under the shim; with `restore` = (criu restore argv, its
        pidfile) the shim adopts the process CRIU restores instead (nodeagent/migrate_slices.py).
        `meta` joins the record's meta before the supervisor starts (a migration's marks).
        `secret_file`: a migration target's transfer secret, written by the agent (migrate_target.py),
        handed to the workload; the same variable in the workload's own environment is ignored.

        Crash-safe: the record is written as PENDING with `starting` in its meta BEFORE the
        supervisor is launched; a restarted agent finds such a record in `load` and re-adopts the
        supervisor it started (found in /proc by its pid-file path) or marks the workload FAILED,
        so a workload never runs twice (`_resolve_start`)."""
        w = types_pb2.Workload()
        w.CopyFrom(spec)
        w.node = self.agent.node
        try:        # its record, files and cgroup are named after them: never a path outside the agent's
            check_id(w.id, "workload.id")
            check_id(w.slice_id, "workload.slice_id")
        except BadId as e:
            w.state, w.message = W.WORKLOAD_STATE_FAILED, str(e)
            w.finished_at.CopyFrom(_ts())
            log(logger, logging.WARNING, "workload not started", node=self.agent.node, workload=w.id[:80], error=str(e))
            return w                # answered, never recorded
        self.workloads[w.id] = w
        st = self.agent.realized.get(w.slice_id)
        if st is None or st.state != types_pb2.SLICE_STATE_READY:
            return self._fail(w, f"slice {w.slice_id} is not ready on node {self.agent.node}")
        if w.HasField("backend") and restore is None:
            from nodeagent import backends     # a model server: its command line and port (deployments)
            try:
                opts = backends.options_of(self.agent)
                backends.prepare(w, opts.host, sys.executable, opts)
            except (ValueError, OSError) as e:
                return self._fail(w, f"cannot start backend {w.backend.kind!r}: {e}")
        env = supervisor_environment()
        env.update(w.env)
        env.update(st.env)          # the slice's own environment always wins
        for k in agent_env_names():     # acted on by the agent as root: never the tenant's (Run refuses them)
            if env.pop(k, None) is not None and k in w.env:
                log(logger, logging.WARNING, "workload environment sets a variable only the agent sets; ignored",
                    node=self.agent.node, workload=w.id, variable=k)
        if secret_file:
            from mesh.checkpoint.transfer_auth import SECRET_FILE_ENV
            env[SECRET_FILE_ENV] = secret_file      # unconfined: the workload runs as the agent's user
        if w.HasField("backend"):   # a model server's API key: its environment only, never w.env or argv
            from nodeagent import backends
            env.update(backends.secret_environment(w))
        env["GPUMESH_WORKLOAD_ID"] = w.id
        env["GPUMESH_CHECKPOINT_SOCKET"] = self.socket_path(w.id)
        argv = [sys.executable, SHIM, "--pid-file", self.path(w.id, "pid"), "--exit-file", self.path(w.id, "exit"),
                "--log-file", self.path(w.id, "log"), "--", *w.command]
        plan = None
        if restore is not None:
            argv[-len(w.command) - 1:] = ["--restore-pidfile", restore[1], "--", *restore[0]]
            if self.isolator is not None:      # CRIU restores the uid; the target's cgroup takes the process
                try:
                    plan = confinement_plan(self, w, st)
                except Exception as e:   # noqa: BLE001
                    return self._fail(w, f"isolation: {e}")
                if restore_uid >= 0 and restore_uid != plan.uid:
                    return self._abandon(w, plan, f"isolation: tenant {w.tenant!r} ran as uid {restore_uid} on the "
                                         f"source node and is uid {plan.uid} here; CRIU would restore it under another "
                                         "tenant's id: give the tenant the same ids on every node (workload_uid_map)")
                argv[argv.index("--restore-pidfile"):argv.index("--restore-pidfile")] = [
                    "--real-ids", f"{plan.uid}:{plan.gid}"]
        elif self.isolator is not None:
            try:
                plan = confinement_plan(self, w, st)
            except Exception as e:   # noqa: BLE001 - IsolationRefused, OSError: the workload does not start
                return self._fail(w, f"isolation: {e}")
            env.update(plan.env)
            hand_over_secret(env, plan, secret_file)
            argv[-len(w.command) - 1:-len(w.command) - 1] = ["--confine", self.path(w.id, "confine.json")]
        if w.HasField("backend") and restore is None:
            from nodeagent import backends     # its TLS key and certificate, in the workload's own directory
            try:
                env.update(backends.server_tls(w, self.path(w.id, "d"), plan, backends.options_of(self.agent)))
            except (ValueError, OSError) as e:
                return self._abandon(w, plan, f"cannot make the TLS certificate of backend {w.backend.kind!r}: {e}")
        stem = self.meta.get(w.id, {}).get("stem")
        record = {"shim_pid": 0, "device_uuid": st.device_uuid,
                  "mps_pipe": st.env.get("CUDA_MPS_PIPE_DIRECTORY", ""), "stop_at": 0.0, "starting": time.time()}
        if stem:
            record["stem"] = stem       # a re-keyed record (same-node migration) keeps its files
        if plan is not None:
            record.update(uid=plan.uid, gid=plan.gid, cgroup=plan.cgroup, socket=plan.socket,
                          namespaces=[] if restore is not None else plan.spec["namespaces"])
            if restore is not None:
                record["cgroup_procs"] = plan.spec["cgroup_procs"]
        record.update(meta or {})
        for ext in ("pid", "exit"):     # a previous run's files would be read as this one's
            try:
                os.unlink(self.path(w.id, ext))
            except FileNotFoundError:
                pass
        self.meta[w.id] = record
        w.state = W.WORKLOAD_STATE_PENDING
        self.save(w.id)                 # durable before the supervisor exists: see `_resolve_start`
        self._crash_point("before-launch")
        env_fd = -1
        try:
            # the shim and the workload's init run as root: the tenant's environment (PYTHONPATH, LD_PRELOAD...)
            # is handed over in a memfd for the workload alone, never theirs (shim.py --env-fd)
            env_fd = environment_fd(env)
            fd = os.open(self.path(w.id, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(fd, "ab") as shim_err:
                p = subprocess.Popen([*argv[:2], "--env-fd", str(env_fd), *argv[2:]], env=supervisor_environment(),
                                     pass_fds=(env_fd,), stdin=subprocess.DEVNULL, stdout=shim_err, stderr=shim_err,
                                     start_new_session=True, cwd=self.dir)
        except OSError as e:
            record.pop("starting", None)
            return self._abandon(w, plan, f"cannot start the supervisor: {e}")
        finally:
            if env_fd >= 0:
                os.close(env_fd)
        self.popens[w.id] = p
        record["shim_pid"] = p.pid
        self._crash_point("after-launch")
        # an isolated workload's init waits for its interface, which needs its pid: wait longer for it
        isolated = plan is not None and plan.spec.get("network") == "isolated"
        deadline = time.monotonic() + (30 if isolated else 5)
        pid_doc = None
        while time.monotonic() < deadline:
            pid_doc = _read_json(self.path(w.id, "pid"))
            if pid_doc or os.path.exists(self.path(w.id, "exit")) or p.poll() is not None:
                break
            time.sleep(0.005)
        if pid_doc:
            w.pid = int(pid_doc["pid"])
            self._attach(w.id, w.pid)
            if isolated:
                try:
                    w.network_address = plug_network(self.isolator.bridge, w.pid)
                except (OSError, RuntimeError) as e:
                    record.pop("starting", None)
                    return self._abandon(w, plan, f"isolation: network: {e}")
        # published RUNNING (which the monitor, on the event loop, follows) only now: it sees a pid, attached
        w.state = W.WORKLOAD_STATE_RUNNING
        w.started_at.CopyFrom(_ts())
        w.message = ""
        record.pop("starting", None)
        self.save(w.id)
        log(logger, logging.INFO, "workload started", node=self.agent.node, workload=w.id, slice=w.slice_id,
            pid=w.pid, command=" ".join(w.command)[:200])
        return w

    def _fail(self, w: types_pb2.Workload, why: str) -> types_pb2.Workload:
        w.state = W.WORKLOAD_STATE_FAILED
        w.message = why
        w.finished_at.CopyFrom(_ts())
        self.save(w.id)
        log(logger, logging.WARNING, "workload not started", node=self.agent.node, workload=w.id, error=why)
        return w

    def _abandon(self, w: types_pb2.Workload, plan, why: str) -> types_pb2.Workload:
        """A start that fails once the isolation plan is made: the plan made the workload's cgroup, and its
        supervisor may run, attached to the device (an isolated workload whose network could not be plugged).
        The record becomes FAILED, which the monitor never finishes (`_finish`), so what the start made goes
        here: the supervisor's process group killed and reaped, its registrations, the cgroup."""
        p = self.popens.pop(w.id, None)
        if p is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self._detach(w.id)
        if plan is not None and plan.cgroup:
            self.isolator.release(plan.cgroup)
        return self._fail(w, why)

    def stop(self, wid: str) -> None:
        self.renewal.on_stop(wid)       # a restart for a new certificate in progress does not start it again
        w = self.workloads.get(wid)
        meta = self.meta.get(wid)
        if w is None or meta is None or w.state != W.WORKLOAD_STATE_RUNNING or meta.get("stop_at"):
            return
        if os.path.exists(self.path(wid, "exit")) or not self.shim_running(wid):
            return      # it ended on its own before the stop came: the monitor records how (`_finish`)
        meta["stop_at"] = time.time()
        self.save(wid)          # before the signal: an agent that dies in between still knows it was a stop
        self._signal(wid, signal.SIGTERM)
        log(logger, logging.INFO, "stopping workload", node=self.agent.node, workload=wid, pid=w.pid)

    def _signal(self, wid: str, sig: int) -> None:
        pid = self.meta[wid].get("shim_pid")
        if not pid or not (wid in self.popens or _shim_alive(pid, self.path(wid, "pid"))):
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- following the processes --------------------------------------------------------

    async def _monitor(self) -> None:
        capped, capping = time.monotonic(), None
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check_all()
                self.renewal.step()
                # beside the monitor, never in its way: a compaction moves up to the bound
                if self.log_max_bytes and time.monotonic() - capped >= LOG_CAP_INTERVAL and \
                        (capping is None or capping.done()):
                    capped, capping = time.monotonic(), asyncio.get_running_loop().create_task(self.logs.cap_running())
            except Exception:   # noqa: BLE001 - keep following the other workloads
                logger.exception("workload monitor")

    def check_all(self, report: bool = True) -> None:
        done = []
        for wid, w in list(self.workloads.items()):
            if w.state != W.WORKLOAD_STATE_RUNNING:
                continue
            meta = self.meta.setdefault(wid, {})
            if meta.get("frozen") or meta.get("renewing"):
                continue        # dumped by a transparent migration, or restarted for a new TLS certificate
                                # (migrate_slices.py, workload_renewal.py): their outcome decides
            running = self.shim_running(wid)
            if not w.pid:
                pid_doc = _read_json(self.path(wid, "pid"))
                if pid_doc:
                    w.pid = int(pid_doc["pid"])
                    self._attach(wid, w.pid)
                    self.save(wid)
            if running:
                if meta.get("stop_at") and time.time() - meta["stop_at"] > self.stop_grace and not meta.get("killed"):
                    meta["killed"] = True
                    self._signal(wid, signal.SIGKILL)
                    self.save(wid)      # after the signal (a restarted agent sends it again); its end names it
                continue
            if self.cgroups.gone(wid, meta.get("cgroup", "")):     # its processes have left: it ended
                done.append(self._finish(wid))
        if report:
            self.report(done)

    def _finish(self, wid: str) -> types_pb2.Workload:
        w, meta = self.workloads[wid], self.meta[wid]
        self.popens.pop(wid, None)
        ex = _read_json(self.path(wid, "exit"))
        stopped = bool(meta.get("stop_at"))
        if meta.get("mps_refused"):
            w.exit_code = 128 + signal.SIGKILL
            w.message = f"killed: {meta['mps_refused']}"
        elif ex is None:
            w.exit_code = 128 + signal.SIGKILL
            w.message = ("killed by SIGKILL: still running when the stop grace after SIGTERM ended"
                         if meta.get("killed") else "killed (its supervisor ended without recording the exit status)")
        else:
            w.exit_code = int(ex.get("exit_code", 0))
            sig = int(ex.get("signal", 0))
            w.message = ex.get("error") or (f"killed by {signal.Signals(sig).name}" if sig else
                                            f"exited with status {w.exit_code}")
        if stopped:
            w.state = W.WORKLOAD_STATE_STOPPED
            w.message = f"{meta.get('stop_reason') or 'stopped on request'}; {w.message}"
        elif ex is not None and w.exit_code == 0 and not ex.get("error") and not meta.get("mps_refused"):
            w.state = W.WORKLOAD_STATE_SUCCEEDED
        else:
            w.state = W.WORKLOAD_STATE_FAILED
        w.finished_at.CopyFrom(_ts(ex["finished_at"]) if ex and ex.get("finished_at") else _ts())
        self._detach(wid)
        self.save(wid)
        log(logger, logging.INFO, "workload ended", node=self.agent.node, workload=wid,
            state=types_pb2.WorkloadState.Name(w.state), exit_code=w.exit_code)
        return w
