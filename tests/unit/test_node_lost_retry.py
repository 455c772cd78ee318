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
