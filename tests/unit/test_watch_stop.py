"""Stopping an etcd watcher (the standby's follower, the leader's alive watch) ends it at once, whenever the stop
comes: while its watch is being created, while it is idle, while events flow. Against a real etcd.

The hang these guard against: aetcd creates a watch by waiting with `asyncio.wait_for`, which on Python 3.11
returns the result, and drops the cancel, when the task is cancelled just as the watch's "created" answer has
woken it (CPython gh-86296). The follower then sat in its new watch, cancelled in name only, until the stop's
bound gave up on it. `EtcdStore.watch_prefix` re-raises such a cancel. Measured by the follower's
`stop_overruns` (stops that hit the bound), never by wall time.
"""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers import nodes as nodes_mod
from controlplane.controllers.nodes import NodeManager
from controlplane.controllers.slices import Controller
from controlplane.state import keys
from controlplane.state.follower import Follower
from controlplane.state.store import EtcdStore


@pytest.fixture(autouse=True)
def stop_bound(monkeypatch):
    """The stops' safety bound at 60 s, not 5: a watch that ends at once still counts no overrun on a worker
    stalled for seconds (etcd's answers come late), and the hang guarded against (for ever) still overruns it."""
    from controlplane.state import follower
    monkeypatch.setattr(follower, "STOP_TIMEOUT_S", 60.0)
    monkeypatch.setattr(nodes_mod, "STOP_TIMEOUT_S", 60.0)


async def _store(etcd_server) -> EtcdStore:
    store = EtcdStore([etcd_server.endpoint])
    await store.connect()
    return store


def _on_watch_created(store: EtcdStore, ticks: int, action) -> list:
    """Run `action()` `ticks` loop iterations after etcd's "watch created" answer wakes the task creating the
    watch (aetcd notifies its waiting add_callback then). Returns a list that holds True once it ran."""
    watcher = store.client._watcher
    cond = watcher._new_callback_ready
    loop = asyncio.get_running_loop()
    ran: list = []

    def later(n: int) -> None:
        if n:
            loop.call_soon(later, n - 1)
        else:
            action()
            ran.append(True)

    def notify_all() -> None:
        type(cond).notify_all(cond)
        cb = watcher._new_callback
        if not ran and cb is not None and cb.watch_id is not None:   # the created answer, not a clean-up
            del cond.notify_all
            later(ticks)
    cond.notify_all = notify_all
    return ran


async def test_the_follower_stops_when_the_stop_lands_as_its_watch_is_created(etcd_server, etcd_client):
    """Each of the first loop iterations after the "created" answer: one of them is where Python 3.11's
    wait_for dropped the cancel (the follower then hung until the stop's bound)."""
    store = await _store(etcd_server)
    try:
        for ticks in range(8):
            f = Follower(store)
            stopping: list[asyncio.Task] = []
            ran = _on_watch_created(store, ticks, lambda: stopping.append(asyncio.create_task(f.stop())))
            f.start()
            for _ in range(3000):
                if ran:
                    break
                await asyncio.sleep(0.01)
            assert ran, "the watch was never created"
            await stopping[0]
            assert f.stop_overruns == 0, f"the watch did not end when stopped {ticks} ticks after its creation"
    finally:
        await store.close()


async def test_the_follower_stops_while_idle_and_while_events_flow(etcd_server, etcd_client):
    store = await _store(etcd_server)
    writes = 0

    async def write_forever():
        nonlocal writes
        while True:
            await etcd_client.put(keys.request("t", f"r{writes % 5}"), b"s-1")
            writes += 1

    try:
        for i in range(10):
            f = Follower(store)
            f.start()
            await f.loaded.wait()
            writer = asyncio.create_task(write_forever()) if i % 2 else None
            if writer is not None:
                base = f.applied
                for _ in range(3000):
                    if f.applied > base + 3:       # events are flowing into the follower
                        break
                    await asyncio.sleep(0.01)
                assert f.applied > base + 3
            else:
                await asyncio.sleep(0.05 * (i % 3))
            await f.stop()
            if writer is not None:
                writer.cancel()
            assert f.stop_overruns == 0, f"stop {i} hit the bound"
    finally:
        await store.close()


async def test_the_alive_watch_stops_when_the_stop_lands_as_it_is_created(etcd_server, etcd_client):
    """The leader's node-lease watch (NodeManager) creates its watch the same way and ends on stop too."""
    store = await _store(etcd_server)
    try:
        for ticks in range(8):
            nodes = NodeManager(Controller(store))
            stopping: list[asyncio.Task] = []
            ran = _on_watch_created(store, ticks, lambda: stopping.append(asyncio.create_task(nodes.stop())))
            await nodes.load()
            for _ in range(3000):
                if ran:
                    break
                await asyncio.sleep(0.01)
            assert ran, "the watch was never created"
            await stopping[0]          # waits at most NodeManager's bound for the watch task to end
            assert nodes._watch_task.done(), f"the alive watch did not end when stopped {ticks} ticks after " \
                                             "its creation"
    finally:
        await store.close()
