"""Workload records: the control plane's copy of `/gpumesh/v1/workloads/<id>`, and their writes.

Every change of an existing record is a read-modify-write (`update`): a change function applied to the record
as it is in memory, written on the condition that etcd still holds that record at the mod revision it was
read at (`Revision`, an etcd compare on mod_revision). Several tasks change one record (a node's status report,
a Stop, the slice follower, a migration's commit); between the moment one computed its record and the moment
etcd took it, another may have written. Unconditional, the later write undid the earlier one: a source node's
report written after a live migration's commit put the workload back on the source. Now the stale write fails
in etcd, and `update` reads the record back from etcd and applies the change again to what is there (a report
from a node that no longer holds the workload then changes nothing, and is logged).

`revisions` holds each record's mod revision as last read or written; a record is adopted in memory only if it
is not older than the one there (`adopt`), so the completion of an older write never hides a newer one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable, Iterable

from controlplane.state import keys
from controlplane.state.store import Absent, Put, Revision
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
W = types_pb2
TERMINAL = (W.WORKLOAD_STATE_SUCCEEDED, W.WORKLOAD_STATE_FAILED, W.WORKLOAD_STATE_STOPPED)
RECORDS_PER_TXN = 50   # records an update writes in one transaction (etcd takes 128 puts and 128 compares)
UPDATE_TRIES = 8       # conflicts in a row before an update gives up (each one means another write went first)

Change = Callable[[types_pb2.Workload], "types_pb2.Workload | None"]


class WorkloadRecords:
    """The workload records in memory, their mod revisions, and the writes that keep etcd and memory in step."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl
        self.workloads: dict[str, types_pb2.Workload] = {}
        self.revisions: dict[str, int] = {}              # workload id -> its record's etcd mod revision
        self.stopping: set[str] = set()                  # stop asked for, process not ended yet
        self.waiters: dict[str, list[asyncio.Future]] = {}
        self.conflicts = 0                               # conditional writes refused: another write went first
        # New records (Run), workload id -> slice id: from the Run's checks until its write's outcome is known, and
        # those whose write failed without a verdict (it may have landed), for a resize's commit (`new_on`)
        self.creating: dict[str, str] = {}
        self.maybe_created: dict[str, str] = {}

    # -- writes ---------------------------------------------------------------------------

    async def save(self, ws: list[types_pb2.Workload], created: bool = False, extra: list = (),
                   extra_conds: list = (), bases: dict[str, int] | None = None) -> int:
        """Write `ws`: new records (`created`: none of them may exist), or records each computed from the one in
        memory with no await in between, or from the one at the mod revision `bases` gives for it (each written
        only if etcd still holds that one: `update` retries). Returns the revision of the write (0 when there
        was nothing to write)."""
        if not ws:
            return 0
        base = bases if bases is not None else self.revisions
        conds = ([Absent(keys.workload(w.id)) for w in ws] if created
                 else [Revision(keys.workload(w.id), base.get(w.id, 0)) for w in ws])
        rev = await self.ctl.writer.write([Put(keys.workload(w.id), w.SerializeToString()) for w in ws] + list(extra),
                                          conds + list(extra_conds))
        for w in ws:
            self.adopt(w, rev)
        return rev

    async def save_created(self, w: types_pb2.Workload, extra: list = (), extra_conds: list = ()) -> int:
        """`save` of the new record `w`, noted in `creating` (by its caller, from its checks on). The write is awaited
        through a cancellation of the caller (queued, it lands all the same), and the note ends with its outcome:
        a failure without a verdict (not a refused precondition) leaves it in `maybe_created`."""
        write = asyncio.ensure_future(self.save([w], created=True, extra=extra, extra_conds=extra_conds))
        write.add_done_callback(functools.partial(self._created, w.id, w.slice_id))
        return await asyncio.shield(write)

    def _created(self, wid: str, slice_id: str, write: asyncio.Future) -> None:
        self.creating.pop(wid, None)
        failed = None if write.cancelled() else write.exception()
        if write.cancelled() or (failed is not None and not isinstance(failed, errors.Aborted)):
            self.maybe_created[wid] = slice_id

    def new_on(self, slice_id: str) -> tuple[list[str], list[str]]:
        """The IDs of new workload records on slice `slice_id` not in `workloads`: (being written, written without
        a verdict). A resize's commit fails on the first and requires the second absent (resize.py)."""
        for wid, sid in list(self.maybe_created.items()):
            if wid in self.workloads or sid not in self.ctl.fleet.slices:
                del self.maybe_created[wid]     # known now (read back), or its slice is gone
        return ([wid for wid, sid in self.creating.items() if sid == slice_id],
                [wid for wid, sid in self.maybe_created.items() if sid == slice_id])

    def adopt(self, w: types_pb2.Workload, rev: int) -> bool:
        """Make `w`, written (or read) at `rev`, the record in memory unless a newer one is there already;
        its state change's event and the calls waiting on it follow."""
        if rev < self.revisions.get(w.id, 0):
            return False
        before = self.workloads.get(w.id)
        if before is None or before.state != w.state:
            self._state_event(w)
        self.workloads[w.id] = w
        self.revisions[w.id] = rev
        if w.state in TERMINAL:
            self.stopping.discard(w.id)
        for fut in self.waiters.pop(w.id, []):
            if not fut.done():
                fut.set_result(w)
        return True

    async def update(self, wids: Iterable[str], change: Change, what: str) -> list[types_pb2.Workload]:
        """Write `change(record)` for each of `wids` it changes (None or an equal record: no change), in one
        transaction; when etcd refuses it because a record was written meanwhile, read those back and apply
        `change` again to the records as they are now. The records written, as written."""
        wids = list(dict.fromkeys(wids))
        written: dict[str, types_pb2.Workload] = {}
        for attempt in range(UPDATE_TRIES):
            changed, bases = [], {}
            for wid in wids:
                w = self.workloads.get(wid)
                n = change(w) if w is not None else None
                if n is not None and n != w:
                    changed.append(n)
                    bases[wid] = self.revisions.get(wid, 0)     # what it was computed from
            try:
                # at most RECORDS_PER_TXN a transaction, so a node's many workloads (a status report, NotReady at
                # load, a node deleted) stay within etcd's 128 puts; a refusal of a later chunk computes again what
                # is still to change. A later chunk is conditioned on the revisions its records were computed
                # from (`bases`), not on those in memory when it is written: a write adopted while an earlier
                # chunk was awaited (a migration's commit) is then refused to it, not undone by it
                for i in range(0, len(changed), RECORDS_PER_TXN):
                    chunk = changed[i:i + RECORDS_PER_TXN]
                    await self.save(chunk, bases=bases)
                    written.update((n.id, n) for n in chunk)
                return [written[wid] for wid in wids if wid in written]
            except errors.Aborted as e:
                self.conflicts += 1
                log(logger, logging.INFO, "workload record written meanwhile; applying the change again to "
                    "the record as it is now", change=what, workloads=[n.id for n in changed], attempt=attempt + 1)
                refused = e
                for n in changed:
                    await self.refresh(n.id)
        raise errors.Aborted(f"workload records {', '.join(wids)} kept changing while {what} was being written "
                             f"({refused})")

    async def refresh(self, wid: str) -> int:
        """Read workload `wid`'s record back from etcd, adopt it in memory if it is newer than the one there (a
        record gone from etcd leaves memory too), and return its mod revision (0: gone)."""
        got = await self.ctl.store.read(keys.workload(wid))
        if got is None:
            if wid in self.workloads:
                log(logger, logging.WARNING, "workload record gone from etcd; dropped", workload=wid)
            self.workloads.pop(wid, None)
            self.revisions.pop(wid, None)
            self.stopping.discard(wid)
            return 0
        value, rev = got
        if wid in self.workloads:      # one that left memory (expiring) does not come back
            self.adopt(types_pb2.Workload.FromString(value), rev)
        return rev

    # -- helpers ------------------------------------------------------------------------------

    def _state_event(self, w: types_pb2.Workload) -> None:
        """The durable event of a workload's state change (controlplane/events/)."""
        state = W.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_")
        reason, kind = {"PENDING": ("Created", "Normal"), "RUNNING": ("Started", "Normal"),
                        "SUCCEEDED": ("Completed", "Normal"), "FAILED": ("Failed", "Warning"),
                        "STOPPED": ("Stopped", "Normal"),
                        "UNKNOWN": ("NodeLost", "Warning")}.get(state, (state.capitalize(), "Normal"))
        text = {"Created": f"on slice {w.slice_id}", "Started": f"pid {w.pid} on {w.node}",
                "Completed": "exited 0", "Failed": f"exit code {w.exit_code}"}.get(reason, state.lower())
        self.ctl.recorder.emit("Workload", w.id, kind, reason, text + (f": {w.message}" if w.message else ""),
                               tenant=w.tenant, node=w.node, source="workload-controller")

    def _copy(self, w: types_pb2.Workload, **fields) -> types_pb2.Workload:
        n = types_pb2.Workload()
        n.CopyFrom(w)
        for k, v in fields.items():
            setattr(n, k, v)
        return n

    async def _wait_until(self, wid: str, done, timeout: float) -> types_pb2.Workload:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(self.workloads[wid]):
            left = deadline - loop.time()
            if left <= 0:
                break
            fut = loop.create_future()
            self.waiters.setdefault(wid, []).append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                break
            finally:        # a call that timed out or was cancelled leaves no future behind
                if fut in (mine := self.waiters.get(wid, [])):
                    mine.remove(fut)
                    if not mine:
                        del self.waiters[wid]
        return self.workloads[wid]
