"""A version number that moves when a slice changes, for the web view's streams to wait on.

One internal subscriber of the slice EventHub (controlplane/api/events.py) for all web streams: each
event bumps `version` and wakes the waiters. The hub is looked up again whenever the subscription ends
(None: a standby reloading, or this subscriber cut off for falling behind) and when there is none yet,
so the feed follows the control plane from standby to leader. The streams also re-check every few
seconds on their own, so nothing depends on this feed being perfect: it only makes changes show at once.
"""

from __future__ import annotations

import asyncio
from typing import Callable

RETRY_S = 0.5


class ChangeFeed:
    def __init__(self, hub: Callable[[], object]) -> None:
        self.hub = hub
        self.version = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="web-view-changes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> None:
        """Until `version` moves past `seen`, or `timeout` seconds (then a short pause so a burst of
        changes, e.g. a gang allocation, is drawn as one frame)."""
        if self.version == seen:
            try:
                async with asyncio.timeout(timeout):     # not wait_for: on 3.11 it can drop a cancel (gh-86296)
                    await self._changed.wait()
            except TimeoutError:
                return
        await asyncio.sleep(0.1)

    async def _run(self) -> None:
        while True:
            hub = self.hub()
            if hub is None:
                await asyncio.sleep(RETRY_S)
                continue
            q = hub.subscribe()            # unnamed: gets None (not an error) when it must subscribe again
            try:
                while True:
                    item = await q.get()
                    if item is None:
                        break
                    self.bump()
            finally:
                hub.unsubscribe(q)
            self.bump()
            await asyncio.sleep(RETRY_S)
