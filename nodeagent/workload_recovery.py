"""Crash recovery of the workload runner (mixed into nodeagent.workloads.WorkloadRunner): what a
restarted agent does with the records a killed one left half-way.

* A workload being started: its record is written (PENDING, `starting` in its meta) before the
  supervisor is launched; `_resolve_start` (from `load`) re-adopts that supervisor, found in /proc
  by its `--pid-file` argument, or marks the workload FAILED. A workload is never started twice.
* A backend being restarted for a new TLS certificate (`renewing` in its meta, workload_renewal.py) whose
  new supervisor never ran: kept RUNNING for the renewal to start it again (its old server had ended).
* A same-node migration's hand-over: the target's record is marked `hand_over_to` before the two
  renames; `finish_hand_over` (from `load`) completes one that was interrupted.
* `shim_running`: whether a supervisor runs, from its Popen or, after a restart, from /proc.
* `_crash_point`: the test hook (MESH_AGENT_TEST_CRASH_AT) that SIGKILLs the agent at those points.
"""

from __future__ import annotations

import logging
import os
import signal

from gpumesh.v1 import types_pb2
from mesh.logs import log
from nodeagent.procfiles import _find_shim, _shim_alive

logger = logging.getLogger("nodeagent.workloads")
W = types_pb2


class RecoveryMixin:
    """Needs the runner's workloads, meta, popens, path, save, rekey, _fail and agent."""

    def finish_hand_over(self, alias: str) -> None:
        """A same-node migration's hand-over (nodeagent/migrate_slices.py `_hand_over`): the record
        `alias`, marked `hand_over_to` = the workload's ID, takes that ID and the source's record moves
        to `alias~source`. Two renames, each durable; the mark stays until both are done, so an agent
        that died between them finishes the hand-over when it loads its records again."""
        wid = self.meta[alias]["hand_over_to"]
        if alias == wid:            # both renames were done; only the mark was left
            self.meta[wid].pop("hand_over_to", None)
            self.save(wid)
            return
        self._crash_point("hand-over")
        if wid in self.workloads:
            self.meta.setdefault(wid, {})["source_of"] = wid    # expired with the workload (`expire`)
            self.rekey(wid, f"{alias}~source")
        self._crash_point("hand-over-half")
        self.rekey(alias, wid)
        self.meta[wid].pop("hand_over_to", None)
        self.save(wid)

    def _mark_unmarked_hand_overs(self) -> None:
        """A hand-over interrupted between its renames without the `hand_over_to` mark (records of an
        agent version before the mark): `<wid>~<migration>~source` is recorded, its target
        `<wid>~<migration>` too (marked with that migration), `<wid>` is not. Mark it to be finished."""
        for key in list(self.workloads):
            if not key.endswith("~source"):
                continue
            alias = key[:-len("~source")]
            mid = self.meta.get(alias, {}).get("migration") if alias in self.workloads else None
            if mid and alias.endswith(f"~{mid}") and alias[:-len(mid) - 1] not in self.workloads:
                self.meta[alias]["hand_over_to"] = alias[:-len(mid) - 1]

    def _crash_point(self, where: str) -> None:
        """Test hook: with MESH_AGENT_TEST_CRASH_AT=<where> in the agent's environment the agent
        SIGKILLs itself there (tests/integration/test_workloads.py proves a restart never starts
        the workload twice). Never set in production."""
        if os.environ.get("MESH_AGENT_TEST_CRASH_AT") == where:
            os.kill(os.getpid(), signal.SIGKILL)

    def _resolve_start(self, wid: str) -> None:
        """A record left `starting` by an agent that died while starting the workload: re-adopt the
        supervisor if it was launched (alive, or its pid/exit file shows it ran; `check_all` then
        follows it), else mark the workload FAILED. Never starts it again."""
        w, meta = self.workloads[wid], self.meta[wid]
        began = float(meta.pop("starting"))
        shim = _find_shim(self.path(wid, "pid"))
        ran = os.path.exists(self.path(wid, "pid")) or os.path.exists(self.path(wid, "exit"))
        if shim or ran:
            meta["shim_pid"] = shim
            w.state = W.WORKLOAD_STATE_RUNNING
            w.started_at.FromNanoseconds(int(began * 1e9))
            w.message = ""
            self.save(wid)
            log(logger, logging.INFO, "workload re-adopted after an interrupted start", node=self.agent.node,
                workload=wid, shim_pid=shim)
        elif meta.get("renewing"):
            # a restart for a new TLS certificate (workload_renewal.py): the old server had ended before this
            # start began, so starting it again never runs it twice; the renewal's first pass does
            w.state, w.pid = W.WORKLOAD_STATE_RUNNING, 0
            w.message = "restarting its server to renew its TLS certificate"
            self.save(wid)
            log(logger, logging.INFO, "interrupted certificate renewal: the server is started again",
                node=self.agent.node, workload=wid)
        else:
            self._fail(w, "the agent restarted while starting this workload and its supervisor never ran: "
                          "not started (a workload is never started twice)")

    def shim_running(self, wid: str) -> bool:
        """Whether the workload's supervisor still runs: its Popen when this agent process started it,
        else its pid in /proc (after an agent restart)."""
        p = self.popens.get(wid)
        if p is not None:
            return p.poll() is None
        meta = self.meta.get(wid, {})
        return bool(meta.get("shim_pid")) and _shim_alive(meta["shim_pid"], self.path(wid, "pid"))
