"""What `/api/snapshot` may cost the control plane: a frame is a List of everything, read on the event loop.

* `FrameCache`: the last frame built for each credential answers that credential's requests for `ttl` seconds, and
  requests that arrive while it is built wait for that build: a burst of one caller costs one frame. Keyed by the
  principal, never shared between two (a tenant's frame is scoped to its tenant).
* `RateLimiter`: a token bucket per client (a bucket of `per_second` requests, at least 1, refilled at that rate);
  `take` answers 0 (served) or the seconds until the next request would be. A refused request takes nothing.

Both run on the event loop only (no locks) and take a clock, so tests move time by hand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Hashable


class RateLimiter:
    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        if not per_second > 0:
            raise ValueError(f"per_second: {per_second!r} must be more than 0")
        self.rate = per_second
        self.burst = max(1.0, per_second)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}     # key -> (tokens, when counted)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """Forget the buckets that have refilled (the same as none); if a flood of clients leaves more than half
        the bound, the longest untouched go too (they get a full bucket back: the bound wins over them)."""
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) > self.max_keys // 2:
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[:len(self._buckets) - self.max_keys // 2]:
                del self._buckets[k]


class _Entry:
    __slots__ = ("future", "done_at")

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future
        self.done_at: float | None = None


class FrameCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[Hashable, _Entry] = {}

    async def get(self, key: Hashable, build: Callable[[], Awaitable[Any]]) -> Any:
        """The value built for `key` less than `ttl` ago, the one being built now, or a new one. A build that
        fails is not kept (its waiters get its exception; the next request builds again)."""
        now = self.clock()
        e = self._entries.get(key)
        if e is None or (e.done_at is not None and now - e.done_at >= self.ttl):
            self._prune(now)
            e = self._entries[key] = _Entry(asyncio.ensure_future(build()))
            e.future.add_done_callback(lambda f, k=key, entry=e: self._finished(k, entry, f))
        # shielded: a request that goes away does not cancel the build others wait on
        return await asyncio.shield(e.future)

    def _finished(self, key: Hashable, e: _Entry, f: asyncio.Future) -> None:
        if f.cancelled() or f.exception() is not None:
            if self._entries.get(key) is e:
                del self._entries[key]
        else:
            e.done_at = self.clock()

    def _prune(self, now: float) -> None:
        for k in [k for k, e in self._entries.items() if e.done_at is not None and now - e.done_at >= self.ttl]:
            del self._entries[k]

    def clear(self) -> None:
        for e in self._entries.values():
            e.future.cancel()
        self._entries.clear()


__all__ = ["FrameCache", "RateLimiter"]
