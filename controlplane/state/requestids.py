"""Request ids (idempotency keys) the control plane remembers: (tenant, request id) -> what the first call
created (an allocation for Allocate, a workload for Run). Each is kept for the configured retention
(`request_id_retention_seconds`); the durable copy is an etcd key under a lease that expires with it
(controllers/slices.py `_request_lease`)."""

from __future__ import annotations

import collections
import time
from typing import Callable


class RequestIds(dict):
    """A dict of (tenant, request id) -> value whose entries older than `ttl()` seconds are dropped,
    oldest first, whenever one is remembered or looked up."""

    def __init__(self, ttl: Callable[[], float]) -> None:
        super().__init__()
        self.ttl = ttl
        self._times: collections.deque = collections.deque()     # (monotonic time, key), oldest first

    def _prune(self, now: float) -> None:
        while self._times and now - self._times[0][0] > self.ttl():
            _, key = self._times.popleft()
            self.pop(key, None)

    def remember(self, tenant: str, request_id: str, value: str) -> None:
        now = time.monotonic()
        self[(tenant, request_id)] = value
        self._times.append((now, (tenant, request_id)))
        self._prune(now)

    def lookup(self, tenant: str, request_id: str) -> str | None:
        self._prune(time.monotonic())
        return self.get((tenant, request_id))

    def forget(self, tenant: str, request_id: str, value: str) -> None:
        """Drop a failed call's id, unless a concurrent call with the same id owns it now."""
        if request_id and self.get((tenant, request_id)) == value:
            del self[(tenant, request_id)]
