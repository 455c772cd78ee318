"""The client's own slice released during its resize, between the commit and the agents' SWAP_SLICES
(controllers/resize.py): the release is answered and recorded at once, but its removal waits for the swap
(Controller.removal_holds). From the commit the record names the new placement while the agent still names the old
one by the client's ID (and the new one by the reserved slice's ID): the removal sent then tore down the wrong
instance or none. On another node the new placement's agent knew no such slice, the swap (without the gone record)
left the old placement under the client's ID, and both instances stayed realized with no record; on the same node
it tore down the old placement and the swap found nothing at it (a MIG slice), so the resize retried it for good.
Now both placements are torn down (the client's after its swap, the old one by the resize), the resize finishes."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.migration_phases import C, P, R, StepFailed
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from tests.unit.test_resize_release_race import FailingCommit
from tests.unit.test_resize_swap_reports import MID, _controller, _manager, _slice


class Agent:
    """A node's session over its realized MIG instances, by the name the agent gives them: `held` name -> device.
    A removal tears down the instance of that name (released either way, as the agent reports); SWAP_SLICES
    renames each record on this node to the instance at its placement (nodeagent/migrate_slices.py: the
    candidates are the record's own ID and the IDs of the command), and fails when none is there (MIG)."""

    def __init__(self, node: str, ctl, mm, held: dict[str, str]) -> None:
        self.node, self.ctl, self.mm, self.held = node, ctl, mm, held
        self.removed: list[str] = []

    def _later(self, coro) -> None:
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(coro))

    def send_upserts(self, slices, revision) -> None:
        pass

    def send_removals(self, ids, revision) -> None:
        self.removed.extend(ids)
        for sid in ids:
            self.held.pop(sid, None)
        self._later(self.ctl.report(self.node, False, [], list(ids)))

    def send(self, msg) -> None:
        if msg.WhichOneof("kind") != "migration" or msg.migration.action != C.SWAP_SLICES:
            return
        cmd = msg.migration
        ids = [s.id for s in cmd.slices]
        moves = {}
        for s in (s for s in cmd.slices if s.node == self.node):
            src = next((k for k in [s.id] + ids if self.held.get(k) == s.device_uuid), None)
            if src is None:
                self._later(self.mm._on_report(self.node, M.MigrationReport(
                    migration_id=MID, event=R.FAILED, message=f"no realized slice here is at the placement of {s.id}")))
                return
            moves[s.id] = src
        devices = {k: self.held.pop(k) for k in moves.values()}
        self.held.update({new: devices[src] for new, src in moves.items()})
        self._later(self.mm._on_report(self.node, M.MigrationReport(migration_id=MID, event=R.SLICES_SWAPPED)))


async def _released_between_commit_and_swap(placements: dict[str, list[str]], x: T.Slice, t: T.Slice):
    ctl = _controller(placements)
    mm, m = _manager(ctl, x, t)
    agents = {}
    for node in placements:
        agents[node] = ctl.sessions.by_node[node] = Agent(node, ctl, mm, {
            s.id: s.device_uuid for s in (x, t) if s.node == node})
    await mm._commit_idle_resize(m)
    assert mm.migrations[MID].phase == P.MIGRATION_PHASE_COMMITTED
    await ctl.release("s-x", wait=False, message="released by its tenant")      # answered OK, recorded
    assert ctl.fleet.slices["s-x"].state == T.SLICE_STATE_RELEASING
    await asyncio.sleep(0.01)           # the agents' reports of anything they did
    assert all(a.removed == [] for a in agents.values())        # no removal before the swap
    await asyncio.wait_for(mm._finish(m), 30)
    for _ in range(5):
        await asyncio.sleep(0.01)
    return ctl, mm, agents


def test_a_client_release_before_the_swap_tears_down_both_placements_on_two_nodes():
    async def main():
        ctl, mm, agents = await _released_between_commit_and_swap(
            {"nA": ["GPU-a"], "nB": ["GPU-b"]},
            _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2))
        assert agents["nA"].held == {} and agents["nB"].held == {}
        assert agents["nB"].removed == ["s-x"] and agents["nA"].removed == ["s-t"]
        assert ctl.fleet.slices == {} and mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
        assert ctl.held_removals == {} and ctl.swapping == {}
    asyncio.run(main())


def test_a_client_release_before_the_swap_on_one_node_lets_the_resize_finish():
    async def main():
        ctl, mm, agents = await _released_between_commit_and_swap(
            {"nA": ["GPU-0", "GPU-1"]},
            _slice("s-x", "nA", 0, "GPU-0", 1), _slice("s-t", "nA", 1, "GPU-1", 2))
        assert agents["nA"].held == {} and agents["nA"].removed == ["s-x", "s-t"]
        assert ctl.fleet.slices == {} and mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
    asyncio.run(main())


class SlowCommit:
    """The writer's `write`: the migration's commit waits for `go`, then lands; every other write at once."""

    def __init__(self) -> None:
        self.commit_waiting, self.go = asyncio.Event(), asyncio.Event()

    async def write(self, ops, conds=()):
        if any(b"/migrations/" in op.key for op in ops) and not self.go.is_set():
            self.commit_waiting.set()
            await self.go.wait()
        await asyncio.sleep(0)
        return 7


def _across_two_nodes(write):
    """A resize of s-x on nA (GPU-a) into the reserved s-t on nB (GPU-b), planned, an agent on each node, the etcd
    writer's stand-in `write`."""
    ctl = _controller({"nA": ["GPU-a"], "nB": ["GPU-b"]})
    ctl.writer.write = write
    mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-a", 1), _slice("s-t", "nB", 0, "GPU-b", 2))
    agents = {n: Agent(n, ctl, mm, held) for n, held in (("nA", {"s-x": "GPU-a"}), ("nB", {"s-t": "GPU-b"}))}
    ctl.sessions.by_node.update(agents)
    return ctl, mm, m, agents


def test_a_client_release_while_the_commit_is_written_waits_for_the_swap():
    async def main():
        etcd = SlowCommit()
        ctl, mm, m, agents = _across_two_nodes(etcd.write)
        commit = asyncio.create_task(mm._commit_idle_resize(m))
        await asyncio.wait_for(etcd.commit_waiting.wait(), 20)
        await ctl.release("s-x", wait=False)        # built on the swapped record: at nB
        assert agents["nA"].removed == [] and agents["nB"].removed == []
        etcd.go.set()
        await asyncio.wait_for(commit, 20)
        await asyncio.wait_for(mm._finish(m), 30)
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert agents["nA"].held == {} and agents["nB"].held == {}
        assert ctl.fleet.slices == {} and mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
    asyncio.run(main())


def test_a_client_release_while_a_failing_commit_is_written_goes_to_the_old_placement():
    """The commit fails: its put-back sends the removal to the placement the agent names by the client's ID."""
    async def main():
        etcd = FailingCommit()
        ctl, mm, m, agents = _across_two_nodes(etcd.write)
        commit = asyncio.create_task(mm._commit_idle_resize(m))
        await asyncio.wait_for(etcd.commit_waiting.wait(), 20)
        await ctl.release("s-x", wait=False)
        etcd.fail.set()
        with pytest.raises(StepFailed, match="s-x"):       # released (or gone already): the resize rolls back
            await asyncio.wait_for(commit, 20)
        assert agents["nA"].removed == ["s-x"] and agents["nB"].removed == [] and ctl.held_removals == {}
        assert agents["nA"].held == {} and "s-x" not in ctl.fleet.slices
    asyncio.run(main())
