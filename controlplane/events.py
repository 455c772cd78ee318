"""In-process fan-out of slice events to Watch streams."""

from __future__ import annotations

import asyncio

from gpumesh.v1 import slice_service_pb2, types_pb2

ADDED = slice_service_pb2.SliceEvent.ADDED
MODIFIED = slice_service_pb2.SliceEvent.MODIFIED
DELETED = slice_service_pb2.SliceEvent.DELETED


class EventHub:
    def __init__(self, max_queue: int = 10_000) -> None:
        self.subscribers: set[asyncio.Queue] = set()
        self.max_queue = max_queue

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(self.max_queue)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)

    def publish(self, kind: int, s: types_pb2.Slice, revision: int) -> None:
        if not self.subscribers:
            return
        ev = slice_service_pb2.SliceEvent(type=kind, slice=s, revision=revision)
        for q in list(self.subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                # A watcher that cannot keep up is cut off rather than slowing everyone.
                self.subscribers.discard(q)
                q.put_nowait(None) if not q.full() else None
