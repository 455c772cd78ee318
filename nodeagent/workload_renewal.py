"""Renewal of a hand-started model server's TLS certificate (the agent's `backend_tls`; docs/security.md).

The agent makes each model server it starts a self-signed certificate valid mesh/tls.py SELF_SIGNED_DAYS
(nodeagent/backends/servertls.py), and every client pins exactly that one (mesh/replicatls.py). A deployment's
replica is rolled by the control plane before its certificate ends (controlplane/serving/observe.py); a backend a
tenant started by hand (`meshctl run --backend`) has no one else to do it, so its agent does, here:

* On every monitor pass (`step`), a RUNNING backend workload whose certificate ends within `renew_before`
  seconds (the agent's `backend_tls_renew_before_seconds`) and that is no deployment's replica is restarted in
  place: its server is ended (SIGTERM, SIGKILL after the stop grace), its registrations and cgroup go as at any
  end, and the runner's own start (`WorkloadRunner.start`) starts it again on the same slice, with the same
  confinement (tenant uid, cgroup, devices), a fresh key and certificate, and the same port while it is free.
  The new certificate and endpoint reach the control plane in a WorkloadStatusReport (the normal status path:
  `Workload.endpoint_certificate`), with a NodeEvent "BackendCertificateRenewed"; a restart that fails leaves
  the workload FAILED with why, and a Warning "BackendCertificateRenewalFailed".
* A renewal that cannot happen now (the slice is not READY, the workload is being migrated) gets a Warning
  "BackendCertificateRenewalBlocked" naming when the certificate expires, once a day until it can.
* Crash-safe: the record is marked `renewing` before the old server is signalled. The monitor leaves a marked
  workload to the renewal (it never records its end), a restarted agent's first pass finishes it (a server
  already running with a fresh certificate only loses the mark), and a start the restarted agent finds
  half-done with the mark is started again rather than failed (workload_recovery.py `_resolve_start`): the old
  server has ended, so the workload never runs twice.
* A stop that arrives meanwhile wins: the server is not started again (`stopped`).

The same restart in place applies a new GPU memory share to a hand-started vLLM (`follow_share`): the control plane
writes the share derived from its slice's new size into the workload's record after an in-place resize
(controlplane/controllers/backendshare.py) and sends the record in a WorkloadCommand; a share there other than
the one the server runs with is kept in the record's meta (`share_wanted`, saved: a restarted agent applies it
too, and a full command on reconnection sends it again) and applied on this pass or, when blocked as above, a
later one. The mark then carries the share; the events are "BackendRestartedForResize" and
"BackendRestartForResizeFailed". vLLM preallocates that share of the GPU at start, so only a restart applies it;
a deployment's replica (replaced by its controller) and llama.cpp (no share) are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import datetime, timezone

from gpumesh.v1 import node_service_pb2, types_pb2
from mesh import replicatls
from mesh.logs import log

logger = logging.getLogger("nodeagent.workloads")
W = types_pb2
RENEW_BEFORE_SECONDS = replicatls.RENEW_BEFORE_SECONDS     # the agent's default: as replicas are rolled
WARN_EVERY = 86400.0            # a blocked renewal's Warning is repeated once a day
REPLICA_LABEL = "gpumesh.replica"   # controlplane/serving/deployspec.py LABEL_REPLICA: rolled by the control plane
KILL_WAIT = 30.0                # seconds a SIGKILLed server's supervisor gets to end
RETRY_AFTER = 60.0              # seconds before a renewal that raised (an I/O error) is tried again
# a workload's fields that belong to one run of its server: a restart starts without them
RUN_FIELDS = ("command", "state", "pid", "exit_code", "started_at", "finished_at", "message",
              "endpoint_certificate", "network_address")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


class CertificateRenewal:
    """The runner's certificate renewals (composition: `runner` is nodeagent.workloads.WorkloadRunner)."""

    def __init__(self, runner, renew_before: float = RENEW_BEFORE_SECONDS, clock=time.time) -> None:
        self.runner, self.renew_before, self.clock = runner, renew_before, clock
        self.tasks: dict[str, asyncio.Task] = {}     # workload id -> its renewal in progress
        self.warned: dict[str, float] = {}           # workload id -> when its blocked renewal was last warned of
        self.stops: set[str] = set()                 # stops that arrived during a renewal
        self.retry_at: dict[str, float] = {}         # workload id -> when a renewal that raised is tried again

    # -- which ------------------------------------------------------------------------------------------

    def _expiring(self, w: types_pb2.Workload) -> bool:
        return replicatls.expiring(w.endpoint_certificate, self.clock(), self.renew_before)

    def blocked(self, w: types_pb2.Workload, meta: dict) -> str:
        """Why `w` cannot be restarted now, or ''."""
        st = self.runner.agent.realized.get(w.slice_id)
        if st is None or st.state != types_pb2.SLICE_STATE_READY:
            return f"its slice {w.slice_id} is not ready"
        if {"frozen", "criu_hold", "hand_over_to"} & set(meta):
            return "it is being migrated"
        return ""

    def step(self) -> None:
        """One check of every workload (on the event loop, from the monitor): begin the renewals that are due or
        were left half-done, warn of those that cannot happen."""
        for wid, w in list(self.runner.workloads.items()):
            if wid in self.tasks:
                if self.tasks[wid].done():
                    self._ended(wid, self.tasks.pop(wid))
                continue
            if self.retry_at.get(wid, 0) > time.monotonic():
                continue
            meta = self.runner.meta.get(wid, {})
            if meta.get("renewing"):
                if w.state in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING):
                    self._begin(wid, resumed=True)      # a renewal an earlier agent process left half-done
                continue
            if "share_wanted" in meta and w.state == W.WORKLOAD_STATE_RUNNING and not meta.get("stop_at"):
                if not self.blocked(w, meta):           # else on a later pass
                    self._begin(wid, share=meta["share_wanted"])
                continue
            if (w.state != W.WORKLOAD_STATE_RUNNING or not w.HasField("backend") or REPLICA_LABEL in w.labels
                    or meta.get("stop_at") or not self._expiring(w)):
                self.warned.pop(wid, None)
                continue
            why = self.blocked(w, meta)
            if not why:
                self._begin(wid)
                continue
            now = self.clock()
            if now - self.warned.get(wid, -WARN_EVERY) >= WARN_EVERY:
                self.warned[wid] = now
                ends = replicatls.expires_at(w.endpoint_certificate)
                self._event("Warning", "BackendCertificateRenewalBlocked",
                            f"workload {wid}: its server's TLS certificate expires {_when(ends)} and cannot be "
                            f"renewed now ({why}); clients will refuse the server after that")
                log(logger, logging.WARNING, "backend certificate renewal blocked", node=self.runner.agent.node,
                    workload=wid, reason=why, expires=_when(ends))

    def follow_share(self, w: types_pb2.Workload) -> None:
        """The control plane's record `w` of a workload this runner has: a hand-started vLLM whose share there
        differs from the one its server runs with is restarted with it (the module's doc)."""
        r = self.runner
        mine = r.workloads.get(w.id)
        if mine is None or not mine.HasField("backend") or mine.backend.kind != "vllm" or \
                REPLICA_LABEL in mine.labels or mine.state not in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING):
            return
        meta = r.meta.setdefault(w.id, {})
        share = w.backend.gpu_memory_utilization
        if share == meta.get("share_wanted", mine.backend.gpu_memory_utilization):
            return
        if share == mine.backend.gpu_memory_utilization:
            meta.pop("share_wanted", None)      # back to the one it runs with
        else:
            meta["share_wanted"] = share
            log(logger, logging.INFO, "backend share changed: its server is restarted with it", node=r.agent.node,
                workload=w.id, share=share, was=mine.backend.gpu_memory_utilization)
        r.save(w.id)
        self.step()

    def _begin(self, wid: str, resumed: bool = False, share: float | None = None) -> None:
        """Start the renewal of `wid` (with `share`: its restart with that GPU memory share); marked at once, so that
        the monitor leaves the workload to it."""
        meta = self.runner.meta.setdefault(wid, {})
        if share is not None:
            meta["renewing"] = {"since": self.clock(), "share": share,
                                "was": self.runner.workloads[wid].backend.gpu_memory_utilization}
        elif not resumed:
            meta["renewing"] = {"since": self.clock(), "certificate_expires":
                                replicatls.expires_at(self.runner.workloads[wid].endpoint_certificate)}
        self.tasks[wid] = asyncio.get_running_loop().create_task(self.renew(wid, resumed), name=f"renew-{wid}")

    def _ended(self, wid: str, task: asyncio.Task) -> None:
        """A renewal task that ended: one that raised is logged and tried again after RETRY_AFTER seconds."""
        if not task.cancelled() and task.exception() is not None:
            self.retry_at[wid] = time.monotonic() + RETRY_AFTER
            log(logger, logging.WARNING, "backend restart in place (certificate renewal or resize) failed; tried "
                "again later", node=self.runner.agent.node, workload=wid, error=repr(task.exception()), retry_s=RETRY_AFTER)

    # -- how ----------------------------------------------------------------------------------------------

    async def renew(self, wid: str, resumed: bool = False) -> types_pb2.Workload:
        """Restart `wid` in place with a fresh certificate, and the new share its mark carries after a resize (in a
        thread: it waits for the old server to end), then report it."""
        r = self.runner
        old, pid = r.workloads[wid].endpoint_certificate, r.workloads[wid].pid
        mark = dict(r.meta.get(wid, {}).get("renewing") or {})
        try:
            w = await asyncio.to_thread(self.restart, wid, resumed)
        finally:
            self.stops.discard(wid)     # acted on by `restart`, whichever way it went
        self.warned.pop(wid, None)
        r.report([w])
        if "share" in mark:
            if w.state == W.WORKLOAD_STATE_RUNNING and w.pid != pid:
                self._event("Normal", "BackendRestartedForResize",
                            f"workload {wid}: backend restarted with --gpu-memory-utilization {mark['share']:.4f} "
                            f"(was {mark.get('was', 0):.4f}): its slice {w.slice_id} was resized (endpoint "
                            f"{w.endpoint})")
            elif w.state == W.WORKLOAD_STATE_FAILED:
                self._event("Warning", "BackendRestartForResizeFailed", f"workload {wid}: {w.message}")
        elif w.state == W.WORKLOAD_STATE_RUNNING and w.endpoint_certificate != old:
            self._event("Normal", "BackendCertificateRenewed",
                        f"workload {wid}: certificate renewed: backend restarted (new certificate valid until "
                        f"{_when(replicatls.expires_at(w.endpoint_certificate))}, endpoint {w.endpoint})")
        elif w.state == W.WORKLOAD_STATE_FAILED:
            self._event("Warning", "BackendCertificateRenewalFailed", f"workload {wid}: {w.message}")
        return w

    def restart(self, wid: str, resumed: bool = False) -> types_pb2.Workload:
        """The blocking part: save the mark, end the old server, start the workload again through the runner's
        start path. `resumed`: the mark was left by an agent process that died. Returns the workload then."""
        r = self.runner
        w, meta = r.workloads[wid], r.meta.setdefault(wid, {})
        running = r.shim_running(wid)
        mark = meta["renewing"]
        why = "certificate renewal" if "share" not in mark else "slice resize"
        if "share" in mark:             # the record takes the new share whatever follows: a later start uses it
            w.backend.gpu_memory_utilization = mark["share"]
            if meta.get("share_wanted") == mark["share"]:   # (a newer one that came meanwhile follows)
                meta.pop("share_wanted")
        if (resumed and running and self._current(w, mark)) or (not resumed and not running):
            # the new server runs already (an agent died before the mark went), or the old one ended on its own
            # just now: nothing to restart; the monitor follows it again (and records an end as it was)
            meta.pop("renewing", None)
            r.save(wid)
            return w
        r.save(wid)                     # before the signal: a restarted agent finishes what this one began
        log(logger, logging.INFO, f"{why}: restarting the backend's server", node=r.agent.node, workload=wid,
            pid=w.pid, **({"share": mark["share"]} if "share" in mark else
                          {"expires": _when(mark["certificate_expires"])}))
        if not self._end(wid):
            meta.pop("renewing", None)
            r.save(wid)
            log(logger, logging.WARNING, f"{why}: the old server did not end; left running",
                node=r.agent.node, workload=wid)
            return w
        r._crash_point("after-stop")
        if wid in self.stops or meta.get("stop_at"):
            return self.stopped(wid)
        spec = types_pb2.Workload()
        spec.CopyFrom(w)
        for f in RUN_FIELDS:
            spec.ClearField(f)
        n = r.start(spec, meta={"renewing": mark})
        if n.state == W.WORKLOAD_STATE_FAILED:
            n.message = f"{why}: the backend could not be restarted: {n.message}"
        r.meta.get(wid, {}).pop("renewing", None)
        r.save(wid)
        if wid in self.stops:           # a stop that came while it was starting
            r.stop(wid)
            self.stops.discard(wid)
        log(logger, logging.INFO if n.state == W.WORKLOAD_STATE_RUNNING else logging.WARNING,
            f"{why}: backend restarted" if n.state == W.WORKLOAD_STATE_RUNNING
            else f"{why}: backend restart failed", node=r.agent.node, workload=wid, pid=n.pid,
            endpoint=n.endpoint, error=n.message if n.state != W.WORKLOAD_STATE_RUNNING else "")
        return n

    def _current(self, w: types_pb2.Workload, mark: dict) -> bool:
        """Whether the server running now is the one the renewal `mark` wanted (an agent died after its start)."""
        if "share" not in mark:
            return not self._expiring(w)
        argv = list(w.command)
        flag = "--gpu-memory-utilization"
        return flag in argv[:-1] and argv[argv.index(flag) + 1] == f"{mark['share']:.4f}"

    def _end(self, wid: str) -> bool:
        """End the old server (SIGTERM, SIGKILL after the stop grace), then what its end leaves: the runner's
        handle, its device registrations, its cgroup. False when it would not end."""
        r = self.runner
        if r.shim_running(wid):
            r._signal(wid, signal.SIGTERM)
            if not self._wait_ended(wid, r.stop_grace):
                r._signal(wid, signal.SIGKILL)
                if not self._wait_ended(wid, KILL_WAIT):
                    return False
        while not r.cgroups.gone(wid, r.meta[wid].get("cgroup", "")):
            time.sleep(r.poll_interval)
        r.popens.pop(wid, None)
        r._detach(wid)
        return True

    def _wait_ended(self, wid: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.runner.shim_running(wid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stopped(self, wid: str) -> types_pb2.Workload:
        """A stop came while the old server was ending: it is not started again; it ended as stopped."""
        r = self.runner
        self.stops.discard(wid)
        r.meta[wid].setdefault("stop_at", time.time())
        w = r._finish(wid)              # recorded ended before the mark goes: the monitor never finishes it twice
        r.meta[wid].pop("renewing", None)
        r.save(wid)
        return w

    def on_stop(self, wid: str) -> None:
        """The runner's stop of `wid` (nodeagent/workloads.py `stop`): kept when a renewal is in progress."""
        task = self.tasks.get(wid)
        if task is not None and not task.done():
            self.stops.add(wid)

    def _event(self, type_: str, reason: str, message: str) -> None:
        from nodeagent.agent import node_event
        if self.runner.outbox is not None:
            self.runner.outbox.put_nowait(node_service_pb2.AgentMessage(event=node_event(type_, reason, message)))
