"""A slice released during its resize, then a control-plane restart before the agents swapped
(controllers/resize.py). The client's release between the commit and the agents' SWAP_SLICES is answered and
written at once (RELEASING), but its removal waits for the swap: the old leader kept it in memory
(Controller.held_removals) only. A new leader resuming the COMMITTED resize swapped on the agents and sent no
removal (its map was empty): the agent kept the instance the released record names, and the record stayed
RELEASING for good. Now the resumed commit sends the removal of each of the two records that is RELEASING (read
from the record, not from the map), and the record goes once the agent reports it torn down."""

from __future__ import annotations

import asyncio
import types

from controlplane.controllers import migrations
from controlplane.controllers.migration_phases import P
from controlplane.state import keys
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from tests.unit.test_resize_client_release import Agent
from tests.unit.test_resize_swap_reports import MID, _controller, _manager, _slice
from tests.unit._workloads_standin import workloads_standin


class Etcd:
    """The fake etcd both leaders share: the writer's `write` keeps every key's value, `load` reads a prefix back
    as EtcdStore.load does (key -> (value, revision, lease))."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        for op in ops:
            if getattr(op, "value", None) is not None:
                self.kv[op.key] = op.value
            else:
                self.kv.pop(op.key, None)
        return 7

    async def load(self, prefix):
        prefix = prefix.encode() if isinstance(prefix, str) else prefix
        return types.SimpleNamespace(kvs={k: (v, 7, 0) for k, v in self.kv.items() if k.startswith(prefix)})


def _leader(etcd: Etcd, nodes: dict[str, list[str]]):
    ctl = _controller(nodes)
    ctl.store = etcd
    ctl.writer.write = etcd.write
    return ctl


async def _new_leader(etcd: Etcd, nodes: dict[str, list[str]], held: dict[str, dict[str, str]]):
    """A control plane started on what etcd holds: the slice records, the migration (COMMITTED: finished by its
    state machine, `MigrationManager.load`), and the agents' sessions, whose instances are named as before the
    swap."""
    ctl = _leader(etcd, nodes)
    for k, v in etcd.kv.items():
        if k.startswith(keys.slice_("")):
            ctl.fleet.put_slice(T.Slice.FromString(v))
    wm = workloads_standin()
    mm = migrations.MigrationManager(ctl, wm)
    agents = {n: Agent(n, ctl, mm, dict(h)) for n, h in held.items()}
    ctl.sessions.by_node.update(agents)
    await mm.load()
    return ctl, mm, agents


def _released_then_restarted(nodes: dict[str, list[str]], x: T.Slice, t: T.Slice):
    async def main():
        etcd = Etcd()
        ctl = _leader(etcd, nodes)
        mm, m = _manager(ctl, x, t)
        for s in (x, t):
            etcd.kv[keys.slice_(s.id)] = s.SerializeToString()
        etcd.kv[keys.migration(MID)] = m.SerializeToString()
        await mm._commit_idle_resize(m)
        await ctl.release("s-x", wait=False, message="released by its tenant")     # answered OK, held
        assert M.Migration.FromString(etcd.kv[keys.migration(MID)]).phase == P.MIGRATION_PHASE_COMMITTED
        assert T.Slice.FromString(etcd.kv[keys.slice_("s-x")]).state == T.SLICE_STATE_RELEASING
        assert ctl.held_removals            # the old leader dies here, before its agents swapped
        held = {n: {s.id: s.device_uuid for s in (x, t) if s.node == n} for n in nodes}
        ctl2, mm2, agents = await _new_leader(etcd, nodes, held)
        task = mm2.tasks[MID]
        await asyncio.wait_for(task, 30)
        for _ in range(5):
            await asyncio.sleep(0.01)       # the agents' reports of their removals
        return etcd, ctl2, mm2, agents
    return asyncio.run(main())


def test_a_release_held_for_the_swap_is_sent_by_the_leader_that_resumes_the_resize_on_two_nodes():
    etcd, ctl, mm, agents = _released_then_restarted(
        {"nA": ["GPU-a"], "nB": ["GPU-b"]}, _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2))
    assert mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
    # nB held the new placement (the client's ID since the swap): torn down; nA's old one by the resize
    assert agents["nB"].removed == ["s-x"] and agents["nA"].removed == ["s-t"]
    assert agents["nA"].held == {} and agents["nB"].held == {}
    assert ctl.fleet.slices == {}
    assert not any(k.startswith(keys.slice_("")) for k in etcd.kv)


def test_a_release_held_for_the_swap_is_sent_by_the_leader_that_resumes_the_resize_on_one_node():
    etcd, ctl, mm, agents = _released_then_restarted(
        {"nA": ["GPU-0", "GPU-1"]}, _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
    assert mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
    assert sorted(agents["nA"].removed) == ["s-t", "s-x"] and agents["nA"].held == {}
    assert ctl.fleet.slices == {}


def test_the_old_placement_released_before_a_restart_is_torn_down_by_the_leader_that_resumes_the_resize():
    """The resize's own release of the old placement written (RELEASING), its removal lost with the leader that
    wrote it: the new leader's release of it changed nothing (RELEASING already) and sent nothing."""
    async def main():
        etcd = Etcd()
        nodes = {"nA": ["GPU-a"], "nB": ["GPU-b"]}
        ctl = _leader(etcd, nodes)
        x, t = _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2)
        mm, m = _manager(ctl, x, t)
        for s in (x, t):
            etcd.kv[keys.slice_(s.id)] = s.SerializeToString()
        etcd.kv[keys.migration(MID)] = m.SerializeToString()
        await mm._commit_idle_resize(m)
        mm.releasing_old.add("s-t")
        await ctl.release("s-t", wait=False, message="old placement of s-x")   # no session: no removal sent
        assert T.Slice.FromString(etcd.kv[keys.slice_("s-t")]).state == T.SLICE_STATE_RELEASING
        # the agents had swapped: nA holds the old placement as s-t, nB the new one as s-x
        ctl2, mm2, agents = await _new_leader(etcd, nodes, {"nA": {"s-t": "GPU-a"}, "nB": {"s-x": "GPU-b"}})
        await asyncio.wait_for(mm2.tasks[MID], 30)
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert mm2.migrations[MID].phase == P.MIGRATION_PHASE_DONE
        assert agents["nA"].removed == ["s-t"] and agents["nA"].held == {}
        assert agents["nB"].removed == [] and agents["nB"].held == {"s-x": "GPU-b"}
        assert list(ctl2.fleet.slices) == ["s-x"] and ctl2.fleet.slices["s-x"].state == T.SLICE_STATE_READY
    asyncio.run(main())
