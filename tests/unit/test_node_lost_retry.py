"""A node whose lease ended has its slices written UNKNOWN even when etcd refused that write the first time:
the node read NotReady from then on, so neither the alive watch nor a re-read of the leases asked again, and its
slices stayed READY (their workloads RUNNING) until the next leader's start."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.controllers import nodes
from controlplane.controllers.nodes import NodeManager
from mesh import errors


class _Node:
    def __init__(self):
        self.ready, self.lease_id = True, 1
        self.record = SimpleNamespace(message="")


async def test_a_failed_mark_of_a_lost_node_is_retried(monkeypatch):
    monkeypatch.setattr(nodes, "LOST_RETRY_S", 0.01)
    calls, fail = [], [2]

    async def mark_node_lost(name, why):
        calls.append(name)
        if fail[0]:
            fail[0] -= 1
            raise errors.Unavailable("etcd: no leader")
    fleet = SimpleNamespace(nodes={"n1": _Node(), "n2": _Node()})
    ctl = SimpleNamespace(fleet=fleet, store=None, sessions={}, mark_node_lost=mark_node_lost,
                          recorder=SimpleNamespace(emit=lambda *a, **k: None))
    nm = NodeManager(ctl)
    await nm._lease_lost("n1")                  # refused: retried in the background, the watch goes on
    assert not fleet.nodes["n1"].ready
    for _ in range(200):
        if not nm._lost_tasks:
            break
        await asyncio.sleep(0.01)
    assert calls == ["n1", "n1", "n1"] and not nm._lost_tasks
    # a node that registers again meanwhile is not marked
    fail[0] = 1
    await nm._lease_lost("n2")
    fleet.nodes["n2"].ready = True
    await asyncio.sleep(0.05)
    assert calls.count("n2") == 1 and not nm._lost_tasks


async def test_the_alive_watch_survives_an_unexpected_error(monkeypatch):
    """A bug in one node's handling (any exception, not only etcd's or the mesh's) ended the alive watch for
    good: no node was ever marked NotReady again on that leader."""
    from controlplane.state import keys
    monkeypatch.setattr(nodes.asyncio, "sleep", _fast_sleep)
    fleet = SimpleNamespace(nodes={"n1": _Node(), "n2": _Node()})
    lost = []

    async def mark_node_lost(name, why):
        if name == "n1":
            raise RuntimeError("a bug")
        lost.append(name)

    class Watch:
        def __init__(self, name):
            self.events = [SimpleNamespace(kind="DELETE", kv=SimpleNamespace(key=(keys.ALIVE + name).encode(),
                                                                              mod_revision=5))]

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.events:
                return self.events.pop()
            await asyncio.Event().wait()                 # open and quiet, as a real watch

        async def cancel(self):
            pass

    watches = iter([Watch("n1"), Watch("n2")])

    async def watch_prefix(prefix, start_revision):
        return next(watches)

    async def load(prefix):
        return SimpleNamespace(kvs={(keys.ALIVE + "n2").encode(): None}, revision=6)   # n2 still alive then
    store = SimpleNamespace(watch_prefix=watch_prefix, load=load)
    ctl = SimpleNamespace(fleet=fleet, store=store, sessions={}, mark_node_lost=mark_node_lost,
                          recorder=SimpleNamespace(emit=lambda *a, **k: None))
    nm = NodeManager(ctl)
    task = asyncio.create_task(nm._watch_alive(1))
    try:
        for _ in range(500):
            if lost:
                break
            await _real_sleep(0.01)
        assert lost == ["n2"] and not fleet.nodes["n2"].ready       # the second watch's event was handled
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


_real_sleep = asyncio.sleep


async def _fast_sleep(s):
    await _real_sleep(min(s, 0.01))
