"""The control plane's background loops: one coroutine run again and again until its owner stops it.

`PeriodicTask` is what the leader's periodic workers share (the orchestrator, the cost accountant, the history
recorder, retention, the event recorder, the autoscaler and the deployment controller): each owns one and
gives it the pass to run (`step`); the runner does the waiting, the error handling and the start and stop.

A pass runs
- every `interval` seconds, counted from the end of one pass to the start of the next (`from_start=False`),
  or from the start of one to the start of the next, never less than `min_gap` apart (`from_start=True`);
- after the first wait, or at once (`at_once=True`);
- early when `wake` is set (the event is cleared before the pass; `interval=None`: only when woken).

`interval` is a number or a function read before each wait (an owner whose interval changes at run time).
An exception from a pass goes to `on_error` (the owner's log line) and the next pass runs as usual; the
loop never ends by itself. `setup` runs once in the task before the first wait (a load from history).

`stop()` cancels the task and waits for it to end. The waits use `asyncio.timeout`, not `asyncio.wait_for`
(on Python 3.11 wait_for can drop a cancel that arrives as what it waits for completes, CPython gh-86296),
and a cancel that a pass swallowed all the same (it shows in `Task.cancelling()`) ends the loop after that
pass: a stop always ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

logger = logging.getLogger(__name__)


def _log_exception(name: str) -> Callable[[Exception], None]:
    def on_error(e: Exception) -> None:
        logger.error("%s failed", name, exc_info=e)
    return on_error


class PeriodicTask:
    def __init__(self, name: str, step: Callable[[], Awaitable[object]], *,
                 interval: float | Callable[[], float] | None,
                 on_error: Callable[[Exception], None] | None = None,
                 at_once: bool = False, from_start: bool = False, min_gap: float = 0.0,
                 wake: asyncio.Event | None = None,
                 setup: Callable[[], Awaitable[object]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval is None and wake is None:
            raise ValueError(f"{name}: a loop needs an interval, a wake event, or both")
        self.name = name
        self.step = step
        self.interval = interval
        self.on_error = on_error or _log_exception(name)
        self.at_once = at_once
        self.from_start = from_start
        self.min_gap = min_gap
        self.wake = wake
        self.setup = setup
        self.clock = clock
        self.passes = 0                     # passes run (tests, logs)
        self.task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        if not self.running:
            self.task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended (a pass in progress is cancelled where it waits)."""
        task, self.task = self.task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping either way
            pass

    def _seconds(self) -> float | None:
        return self.interval() if callable(self.interval) else self.interval

    async def _wait(self, seconds: float | None) -> None:
        """`seconds` (None: for ever), or until `wake` is set; then clear `wake`."""
        if self.wake is None:
            await asyncio.sleep(seconds)
            return
        try:
            async with asyncio.timeout(seconds):
                await self.wake.wait()
        except TimeoutError:
            pass
        self.wake.clear()

    async def _run(self) -> None:
        me = asyncio.current_task()
        asked = me.cancelling()
        if self.setup is not None:
            await self.setup()
        first = True
        last_start = 0.0
        while True:
            if not (first and self.at_once):
                seconds = self._seconds()
                if self.from_start and seconds is not None and not first:
                    seconds = max(self.min_gap, seconds - (self.clock() - last_start))
                await self._wait(seconds)
            first = False
            last_start = self.clock()
            try:
                await self.step()
            except Exception as e:  # noqa: BLE001 - a failed pass is retried at the next one
                self.on_error(e)
            self.passes += 1
            if me.cancelling() > asked:     # cancelled, but the cancel was swallowed inside the pass
                raise asyncio.CancelledError()
