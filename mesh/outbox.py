"""A bounded outbox for a long-lived stream: full means the stream ends, never unbounded memory.

The Sync stream between an agent and the control plane carries state that is resent in full on
every new stream (desired slices, workload commands, reports). So when the peer stops reading and
the outbox reaches its bound (`limit` messages, or `max_bytes` of serialized messages), nothing is
lost by ending the stream: the outbox drops further messages and queues the end marker (None)
once; the reconnect resynchronizes everything.
"""

from __future__ import annotations

import asyncio

DEFAULT_LIMIT = 10_000
DEFAULT_MAX_BYTES = 256 << 20


class Outbox(asyncio.Queue):
    def __init__(self, limit: int = DEFAULT_LIMIT, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()          # unbounded underneath: the end marker always fits
        self.limit = limit
        self.max_bytes = max_bytes
        self.bytes = 0
        self.overflowed = False
        self.dropped = 0

    @staticmethod
    def _size(item) -> int:
        size = getattr(item, "ByteSize", None)
        return size() if size is not None else 0

    def put_nowait(self, item) -> None:
        if item is not None:
            size = self._size(item)
            if self.overflowed or self.qsize() >= self.limit or self.bytes + size > self.max_bytes:
                self.dropped += 1
                if not self.overflowed:
                    self.overflowed = True
                    super().put_nowait(None)     # end the stream: the peer reconnects and resyncs
                return
            self.bytes += size
        super().put_nowait(item)

    def get_nowait(self):
        item = super().get_nowait()
        if item is not None:
            self.bytes = max(0, self.bytes - self._size(item))
        return item
