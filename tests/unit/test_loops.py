"""controlplane/loops.py: the background-loop runner the leader's periodic workers share."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.loops import PeriodicTask


class Waits(PeriodicTask):
    """Records each wait's length instead of waiting (a pass then runs at once)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[float | None] = []

    async def _wait(self, seconds):
        self.waits.append(seconds)
        await asyncio.sleep(0)


async def until(cond, what: str) -> None:
    for _ in range(3000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_a_failed_pass_goes_to_on_error_and_the_next_passes_run():
    errors, calls = [], []

    async def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    loop = PeriodicTask("t", step, interval=0.001, on_error=errors.append)
    loop.start()
    await until(lambda: len(calls) >= 4, "4 passes")
    await loop.stop()
    assert [str(e) for e in errors] == ["boom"]
    assert not loop.running and loop.task is None


async def test_waits_between_passes_from_the_end_or_from_the_start():
    now = [100.0]

    async def step():               # every pass takes 4 s of the (fake) clock
        now[0] += 4.0

    gap = Waits("gap", step, interval=10.0, clock=lambda: now[0])
    rate = Waits("rate", step, interval=10.0, from_start=True, min_gap=0.05, at_once=True, clock=lambda: now[0])
    short = Waits("short", step, interval=3.0, from_start=True, min_gap=0.05, at_once=True, clock=lambda: now[0])
    for t in (gap, rate, short):
        t.start()
    await until(lambda: all(t.passes >= 3 for t in (gap, rate, short)), "3 passes each")
    for t in (gap, rate, short):
        await t.stop()
    assert gap.waits[:3] == [10.0, 10.0, 10.0]          # waits first, the full interval after each pass
    assert rate.waits[:2] == [6.0, 6.0]                  # first pass at once; 10 s from start to start
    assert short.waits[:2] == [0.05, 0.05]               # a pass longer than the interval: the minimum gap


async def test_the_interval_is_read_before_each_wait():
    every = [5.0]
    loop = Waits("t", lambda: asyncio.sleep(0), interval=lambda: every[0])
    loop.start()
    await until(lambda: loop.passes >= 1, "a pass")
    every[0] = 7.0
    n = len(loop.waits)
    await until(lambda: loop.passes >= n + 1, "another pass")
    await loop.stop()
    assert loop.waits[0] == 5.0 and loop.waits[-1] == 7.0


async def test_a_wake_runs_a_pass_at_once_and_is_cleared_first():
    wake = asyncio.Event()
    seen = []

    async def step():
        seen.append(wake.is_set())

    loop = PeriodicTask("t", step, interval=None, wake=wake)
    loop.start()
    for _ in range(5):
        await asyncio.sleep(0)
    assert loop.passes == 0                                 # interval None: only a wake runs a pass
    wake.set()
    await until(lambda: loop.passes == 1, "the woken pass")
    wake.set()
    await until(lambda: loop.passes == 2, "the second woken pass")
    await loop.stop()
    assert seen == [False, False]


async def test_setup_runs_once_before_the_first_pass():
    order = []

    async def setup():
        order.append("setup")

    async def step():
        order.append("pass")

    loop = PeriodicTask("t", step, interval=0.001, at_once=True, setup=setup)
    loop.start()
    await until(lambda: loop.passes >= 3, "3 passes")
    await loop.stop()
    assert order[:3] == ["setup", "pass", "pass"] and order.count("setup") == 1


async def test_stop_ends_the_loop_while_it_waits_and_while_a_pass_runs():
    waiting = PeriodicTask("waiting", lambda: asyncio.sleep(0), interval=3600.0)
    waiting.start()
    await asyncio.sleep(0)
    stuck = asyncio.Event()
    started = []

    async def step():
        started.append(1)
        await stuck.wait()            # never set

    busy = PeriodicTask("busy", step, interval=0.0, at_once=True)
    busy.start()
    await until(lambda: started, "the pass started")
    tasks = [waiting.task, busy.task]
    await waiting.stop()
    await busy.stop()
    assert all(t.done() for t in tasks)


async def test_stop_ends_the_loop_when_a_pass_swallows_the_cancel():
    """What Python 3.11's asyncio.wait_for can do (CPython gh-86296): the cancel reaches the pass and is lost
    there. The runner sees it in Task.cancelling() and ends after that pass."""
    started = asyncio.Event()

    async def step():
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass                          # swallowed

    loop = PeriodicTask("t", step, interval=0.0, at_once=True)
    loop.start()
    await started.wait()
    task = loop.task
    stopping = asyncio.create_task(loop.stop())
    done, _ = await asyncio.wait({stopping}, timeout=60)
    assert done and task.done() and loop.passes == 1


def test_a_loop_needs_an_interval_or_a_wake():
    with pytest.raises(ValueError, match="interval"):
        PeriodicTask("t", lambda: asyncio.sleep(0), interval=None)
