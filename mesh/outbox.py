"""A bounded outbox for a long-lived stream: full means the stream ends, never unbounded memory.

The Sync stream between an agent and the control plane carries state that is resent in full on
every new stream (desired slices, workload commands, reports). So when the peer stops reading and
the outbox reaches its bound, nothing is lost by ending the stream: the outbox drops further
messages and queues the end marker (None) once; the reconnect resynchronizes everything.
"""

from __future__ import annotations

import asyncio

DEFAULT_LIMIT = 10_000


class Outbox(asyncio.Queue):
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__()          # unbounded underneath: the end marker always fits
        self.limit = limit
        self.overflowed = False
        self.dropped = 0

    def put_nowait(self, item) -> None:
        if item is not None and (self.overflowed or self.qsize() >= self.limit):
            self.dropped += 1
            if not self.overflowed:
                self.overflowed = True
                super().put_nowait(None)     # end the stream: the peer reconnects and resyncs
            return
        super().put_nowait(item)
