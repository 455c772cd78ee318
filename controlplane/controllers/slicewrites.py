"""The slice controller's writes of changes already made in the fleet (held by Controller as `writes`,
controllers/slices.py): in transactions etcd takes, and the fleet put back as etcd has it when one fails."""

from __future__ import annotations

import asyncio
import logging

from controlplane.state import keys
from gpumesh.v1 import types_pb2
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.slices")
SAVE_BATCH = 50         # slice records per transaction of save_or_restore (etcd takes 128 puts and 128 compares)


class SliceWrites:
    """Over a Controller: its save, fleet, store and _state_changes (read through it: tests replace them)."""

    def __init__(self, ctl) -> None:
        self.ctl = ctl

    async def save_or_restore(self, changed: list[types_pb2.Slice], priors: list[types_pb2.Slice],
                              deleted: list[types_pb2.Slice] = ()) -> int:
        """`save(changed, deleted)` of slices `_update` already put in the fleet (and `deleted` ones already
        dropped), SAVE_BATCH a transaction (a node's many MPS or time-share slices went past etcd's 128 puts);
        when a write fails, the fleet is put back as etcd has it (`_put_back`) for that transaction and the
        ones after it, so the next attempt (a retry, the agent's next report) sees the change still to make."""
        items, by_id, rev = [(c, None) for c in changed] + [(None, d) for d in deleted], {p.id: p for p in priors}, 0
        for i in range(0, len(items), SAVE_BATCH):
            # a changed slice another change was built on while an earlier batch was awaited (a release: its
            # write, queued before this batch, carries this change's fields) is left to that change: written
            # here, the older record went over the newer one in etcd (RELEASING undone)
            batch = [(c, d) for c, d in items[i:i + SAVE_BATCH] if c is None or self.ctl.fleet.slices.get(c.id) is c]
            if not batch:
                continue
            try:
                rev = await self.ctl.save([c for c, _ in batch if c is not None],
                                          [d for _, d in batch if d is not None])
            except BaseException as e:
                for c, _ in items[i:]:
                    if c is not None:
                        self.ctl._state_changes.pop(c.id, None)
                await self._put_back(items[i:], by_id, read=not isinstance(e, asyncio.CancelledError))
                raise
        return rev

    async def _put_back(self, items: list, priors: dict, read: bool) -> None:
        """After a failed write of `items` ((changed, None) or (None, deleted)): each slice whose fleet record is
        still the one this change left (the changed record itself; a deleted one still absent) is put back as
        etcd has it. A slice another change was built on meanwhile (a report, a release, queued behind this one:
        the writer commits one key's writes in order, in transactions of their own, so theirs may be taken when
        this one was not) is left as that change made it: its write carries this change's fields too, and its
        own outcome decides. Read back, not the priors: a prior may itself be an unwritten change (a chain of
        failed writes), and a write that timed out may have been applied. Where etcd cannot be read (or the
        caller is cancelled), the priors, as before."""
        def left_as_this_change_made_it(c, sid: str) -> bool:
            return self.ctl.fleet.slices.get(sid) is c if c is not None else sid not in self.ctl.fleet.slices

        for c, gone in items:
            sid = (c or gone).id
            if not left_as_this_change_made_it(c, sid):
                continue            # built on by a later change (or put back already): left to that one
            found, etcd = False, None
            if read:
                try:
                    etcd, found = await self.ctl.store.read(keys.slice_(sid)), True
                except Exception as e:  # noqa: BLE001 - etcd unreadable (or a stand-in store): the priors
                    log(logger, logging.INFO, "slice not read back after a failed write; putting back the prior",
                        slice=sid, error=str(e))
                    read = False    # the rest too: etcd is down, each read would wait its timeout
            if not left_as_this_change_made_it(c, sid):
                continue            # changed during the read
            if found:
                if etcd is None:
                    self.ctl.fleet.drop_slice(sid)
                else:
                    self.ctl.fleet.put_slice(types_pb2.Slice.FromString(etcd[0]), etcd[1])
            elif c is not None and sid in priors:
                self.ctl.fleet.put_slice(priors[sid])
            elif gone is not None:
                self.ctl.fleet.put_slice(gone)
