"""The control plane's own releases (a drain's evictions, a preemption's victims) of a slice that only its owner
may release for a while, and will release itself: a resize's old placement in its commit window (resize.py
`_refuse_old_placement`). A tenant's Release of it is refused (FAILED_PRECONDITION); an eviction waits for that
window to end and is made then (the slice RELEASING by its resize, or gone), instead of failing the whole drain
or allocation."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Awaitable, Callable

from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.slices")
EVICT_WAIT_S = 120.0
"""How long an eviction waits for a resize to release its old placement (its swap, the target's resume and the
source's stop: seconds when its agents answer) before it gives up."""


@dataclasses.dataclass
class ReleaseDeferred(errors.FailedPrecondition):
    """A release hook's refusal of a slice its owner releases itself soon; `until(timeout)` returns once that may
    have happened (at most `timeout` seconds later), for the release to be tried again."""

    until: Callable[[float], Awaitable[None]] | None = None


async def evict(ctl, ident: str, message: str, timeout: float) -> list:
    """`ctl.release(ident, wait=False, message=message)`, waiting (up to `timeout` seconds in all) through a
    ReleaseDeferred and trying again; after it the slices as they are (those gone meanwhile left out: an
    allocation all gone, []). Raises the last ReleaseDeferred when the wait ran out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    deferred = False
    while True:
        try:
            return await ctl.release(ident, wait=False, message=message)
        except errors.NotFound:
            if deferred:        # released by its owner and gone while this waited
                return []
            raise
        except ReleaseDeferred as e:
            left = deadline - loop.time()
            if e.until is None or left <= 0:
                raise
            if not deferred:
                log(logger, logging.INFO, "eviction waits for the slice's owner to release it", target=ident,
                    why=e.message, timeout_s=timeout)
            deferred = True
            await e.until(left)


async def preempt(ctl, victims: list[str], alloc_id: str, req) -> None:
    """Evict the allocations `victims` for allocation `alloc_id` of request `req` (Controller.allocate: its
    slices are in the fleet already). A victim in a resize's commit window is waited for (`evict`); when the
    resize outlasts `ctl.evict_wait`, UNAVAILABLE: nothing is allocated, and the refusal, which names another
    tenant's slices, stays in the log."""
    for victim in victims:
        log(logger, logging.INFO, "preempting", victim=victim, allocation=alloc_id, priority=req.priority,
            tenant=req.tenant)
        # the victim's tenant reads the message: another tenant's name and allocation stay in the log
        try:
            slices = ctl.find(victim)
        except errors.NotFound:     # released by its tenant and gone while an earlier one was evicted: room made
            continue
        own = all(s.tenant == req.tenant for s in slices)
        message = (f"preempted by allocation {alloc_id} (priority {req.priority}) of tenant {req.tenant}" if own
                   else f"preempted by a higher-priority allocation (priority {req.priority}) of another tenant")
        try:
            await evict(ctl, victim, message, ctl.evict_wait)
        except ReleaseDeferred as e:
            log(logger, logging.WARNING, "preemption: a victim's resize did not end", victim=victim,
                allocation=alloc_id, timeout_s=ctl.evict_wait, error=e.message)
            raise errors.Unavailable(f"a lower-priority allocation to preempt holds a slice being resized, whose "
                                     f"resize did not end within {ctl.evict_wait:g} s; nothing was allocated: "
                                     f"retry") from None
