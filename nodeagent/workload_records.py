"""The workload runner's records and files (mixed into nodeagent.workloads.WorkloadRunner): where a
workload's files are (`<runner dir>/<id or stem>.<ext>`: record `.json`, `.pid` and `.exit` from the shim,
`.log`, the confinement plan `.confine.json`, its own directory `.d`), its control socket, the records a
restarted agent loads, and what goes when a workload is forgotten or its record expires."""

from __future__ import annotations

import json
import logging
import os
import shutil

from google.protobuf import json_format

from gpumesh.v1 import types_pb2
from mesh.logs import log
from nodeagent.procfiles import _read_json

logger = logging.getLogger("nodeagent.workloads")
W = types_pb2
SHORT_SOCKET_PREFIX = "/tmp/gpumesh-"   # a control socket's name when the runner's directory is too deep


class RecordsMixin:
    """Needs the runner's dir, workloads, meta, popens, logs, agent, and (`load`) the RecoveryMixin."""

    def path(self, wid: str, ext: str) -> str:
        # A record re-keyed by a same-node migration (`rekey`) keeps its files' stem.
        return os.path.join(self.dir, f"{self.meta.get(wid, {}).get('stem') or wid}.{ext}")

    def rekey(self, old: str, new: str) -> None:
        """Let the record `old` answer to the ID `new` (its files keep their names): a same-node
        migration swaps the source and the target process under the workload's ID."""
        if new in self.workloads:
            raise RuntimeError(f"workload {new} is recorded here already")
        w, meta = self.workloads.pop(old), self.meta.pop(old, {})
        meta.setdefault("stem", old)
        w.id = new
        self.workloads[new], self.meta[new] = w, meta
        if old in self.popens:
            self.popens[new] = self.popens.pop(old)
        self.save(new)

    def socket_path(self, wid: str) -> str:
        """The workload's checkpoint control socket ($GPUMESH_CHECKPOINT_SOCKET) as the agent sees
        it: in the workload's own directory when it is confined (it names another path inside);
        else a short path under /tmp when the runner's directory is too deep for a Unix socket name."""
        if self.meta.get(wid, {}).get("socket"):
            return self.meta[wid]["socket"]
        path = self.path(wid, "sock")
        if len(path) > 100:
            import hashlib
            path = f"{SHORT_SOCKET_PREFIX}{hashlib.sha256(path.encode()).hexdigest()[:16]}.sock"
        return path

    def forget(self, wid: str) -> None:
        """Drop the record of a workload that is not running here (before it is started here again)."""
        w = self.workloads.get(wid)
        if w is not None and w.state == W.WORKLOAD_STATE_RUNNING:
            raise RuntimeError(f"workload {wid} still runs")
        # named before the record goes: a re-keyed record's files keep its stem (`rekey`), not its ID
        files = [self.path(wid, ext) for ext in ("pid", "exit", "json", "confine.json")]
        self.workloads.pop(wid, None)
        self.meta.pop(wid, None)
        self.popens.pop(wid, None)
        for path in files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def load(self) -> None:
        """Read every workload record left by a previous agent process."""
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json") or name.endswith(".tmp"):
                continue
            doc = _read_json(os.path.join(self.dir, name))
            if not doc or "workload" not in doc:
                continue
            w = json_format.ParseDict(doc["workload"], types_pb2.Workload(), ignore_unknown_fields=True)
            self.workloads[w.id] = w
            self.meta[w.id] = doc.get("meta", {})
        for wid in [k for k, m in self.meta.items() if m.get("starting")]:
            self._resolve_start(wid)
        self._mark_unmarked_hand_overs()
        for alias in [k for k, m in self.meta.items() if m.get("hand_over_to")]:
            log(logger, logging.INFO, "finishing an interrupted hand-over", node=self.agent.node, alias=alias,
                workload=self.meta[alias]["hand_over_to"])
            self.finish_hand_over(alias)
        if self.workloads:
            log(logger, logging.INFO, "workload records loaded", node=self.agent.node, count=len(self.workloads),
                running=sum(1 for w in self.workloads.values() if w.state == W.WORKLOAD_STATE_RUNNING))

    def save(self, wid: str) -> None:
        """Write `wid`'s record as it is now. One save at a time (`save_lock`): a start's thread and the event loop
        save the same record, and two writers of its one temporary file tore it or lost a rename."""
        with self.save_lock:
            doc = {"workload": json_format.MessageToDict(self.workloads[wid]), "meta": self.meta.get(wid, {})}
            tmp = self.path(wid, "json.tmp")
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
                json.dump(doc, f)        # the record holds the workload's environment: root-only
            os.replace(tmp, self.path(wid, "json"))

    def expire(self, wid: str) -> None:
        """The control plane's record of a finished workload expired: delete its record, its log and
        its own directory (the confined workload's /tmp and cwd); and so those of the sources it was
        handed over from by same-node migrations (`<wid>~<migration>~source`, marked `source_of`: the
        control plane knows them not, so nothing else expires them)."""
        w = self.workloads.get(wid)
        if w is not None and w.state in (W.WORKLOAD_STATE_RUNNING, W.WORKLOAD_STATE_PENDING):
            return          # never the files of a workload that still runs
        for source in [k for k, m in self.meta.items() if m.get("source_of") == wid and k != wid]:
            self.expire(source)
        logfile, workdir, sock = self.path(wid, "log"), self.path(wid, "d"), self.socket_path(wid)
        self.forget(wid)
        # and the short name of its control socket under /tmp (a runner directory too deep for a socket's name)
        for path in (logfile, *([sock] if sock.startswith(SHORT_SOCKET_PREFIX) else [])):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
        self.logs.cut.pop(logfile, None)
