"""In-process fan-out to watch streams, and the bound on what a slow watcher may hold.

Every server-streaming watch (SliceService.Watch, MigrationService.Watch, WorkloadService.Logs) and
every internal follower reads from a `Subscription`: a queue with a per-subscriber bound
(`watch_queue_limit`). A subscriber that has that many events queued is cut off instead of slowing
everyone or growing without end: its queue is emptied, it gets a LAGGED marker, and when it is an
RPC its call is ended with RESOURCE_EXHAUSTED naming the watch and how far it fell behind, even if
its handler is blocked sending to a client that stopped reading. The client lists again and watches
from the listed revision. Internal followers catch the same error and resynchronize from the fleet.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from prometheus_client import Counter

from gpumesh.v1 import slice_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)

ADDED = slice_service_pb2.SliceEvent.ADDED
MODIFIED = slice_service_pb2.SliceEvent.MODIFIED
DELETED = slice_service_pb2.SliceEvent.DELETED

DEFAULT_LIMIT = 10_000
CUT_GRACE_S = 1.0       # a handler that is not blocked sees LAGGED itself within this; else it is aborted

CUT_OFF = Counter("gpumesh_watch_cut_off_total", "Watch streams and followers cut off for falling behind", ["watch"])


class _Lagged:
    def __repr__(self) -> str:
        return "LAGGED"


LAGGED = _Lagged()


class Subscription(asyncio.Queue):
    """A watcher's queue: at most `limit` items; one more cuts the watcher off (see the module doc).

    `None` (put by whoever ends watches, e.g. a standby reloading) is always accepted and means
    "watch again"."""

    def __init__(self, what: str, limit: int = DEFAULT_LIMIT, context=None, marker=LAGGED) -> None:
        super().__init__()
        self.what = what
        self.marker = marker            # queued when cut off: LAGGED, or None for followers that resubscribe on None
        self.limit = max(1, int(limit))
        self.context = context          # the RPC's context: aborted if its handler does not see LAGGED
        self.cut = False
        self.behind = 0
        self.done = False
        self.on_cut: list = []

    def put_nowait(self, item) -> None:
        if self.cut:
            self.behind += item is not None
            return
        if item is not None and self.qsize() >= self.limit:
            self._cut_off()
            return
        super().put_nowait(item)

    def message(self) -> str:
        return (f"{self.what} fell behind by {self.behind} events (at most {self.limit} may wait for a watcher; this "
                f"client is not reading fast enough): the watch was cut off; list again and watch from the listed "
                f"revision")

    def _cut_off(self) -> None:
        self.cut = True
        self.behind = self.qsize() + 1
        self._queue.clear()                      # the events are not delivered: free them now
        super().put_nowait(self.marker)
        CUT_OFF.labels(self.what).inc()
        log(logger, logging.WARNING, "watcher cut off: it fell behind", watch=self.what, limit=self.limit)
        for hook in self.on_cut:
            hook(self)
        if self.context is not None:
            asyncio.get_running_loop().call_later(CUT_GRACE_S, lambda: asyncio.ensure_future(self._abort()))

    async def _abort(self) -> None:
        """The handler is still blocked (typically sending to a client that stopped reading): end the
        call from here with the status the handler would have sent."""
        if self.done:
            return
        self.done = True
        try:
            await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message())
        except Exception:  # noqa: BLE001 - AbortError (expected), or the call already ended
            pass

    async def next(self):
        """The next item; raises errors.ResourceExhausted once this watcher was cut off."""
        item = await self.get()
        if item is LAGGED:
            self.done = True
            raise errors.ResourceExhausted(self.message())
        return item

    def finish(self) -> None:
        self.done = True


class EventHub:
    def __init__(self, max_queue: int = DEFAULT_LIMIT) -> None:
        self.subscribers: set[Subscription] = set()
        self.max_queue = max_queue

    def subscribe(self, what: str = "", context=None) -> Subscription:
        """A bounded subscription. Unnamed ones (internal followers that resubscribe and resync when
        they read None) get None when cut off; named ones get LAGGED (next() raises ResourceExhausted)."""
        q = Subscription(what or "internal slice follower", self.max_queue, context,
                         marker=LAGGED if what else None)
        q.on_cut.append(self.subscribers.discard)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q) -> None:
        self.subscribers.discard(q)
        if isinstance(q, Subscription):
            q.finish()

    def end_all(self) -> None:
        """End every watch (they watch again): a standby reloading or stopping."""
        for q in list(self.subscribers):
            self.subscribers.discard(q)
            q.put_nowait(None)

    def publish(self, kind: int, s: types_pb2.Slice, revision: int) -> None:
        if not self.subscribers:
            return
        ev = slice_service_pb2.SliceEvent(type=kind, slice=s, revision=revision)
        for q in list(self.subscribers):
            q.put_nowait(ev)        # a subscriber that cannot keep up is cut off (and unsubscribes)
