"""A drain or a preemption that meets a resize's reserved slice in its commit window waits for the resize.

From the resize's commit write until the resize releases it itself, its reserved slice (the old placement since
the commit) is released by no one else (controllers/resize.py `_refuse_old_placement`): its agent still names the
new placement by that ID until SWAP_SLICES. A drain of its node, and an allocation that preempted it, failed on
that refusal with FAILED_PRECONDITION: the drain stopped half way (what came after it was not evicted), the
allocation was refused though room was being made. Both are the control plane's own releases of a slice the
resize releases anyway: they wait for the resize to end (Controller.evict), the drain evicting the rest first."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers import nodes as nodes_mod
from controlplane.controllers import resize
from controlplane.controllers.migration_phases import P
from gpumesh.v1 import types_pb2 as T
from mesh import errors, slicespec
from tests.unit.test_resize_client_release import Agent
from tests.unit.test_resize_swap_reports import MID, _controller, _manager, _slice

NODES = {"nA": ["GPU-0"]}


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """The waits look again every RESEND seconds when the resize's state machine is not running yet (here: started
    by the test once the eviction waits); the product's is seconds. Nothing here depends on timing."""
    monkeypatch.setattr(resize, "RESEND", 0.02)


async def _committed(extra: list[T.Slice] = ()):
    """A resize of s-x (MPS, 30 -> 40 GiB) on its own GPU, committed, its agent not yet asked to swap."""
    ctl = _controller(NODES)
    for s in extra:
        ctl.fleet.put_slice(s)
    mm, m = _manager(ctl, _slice("s-x", "nA", 0, "GPU-0", 30), _slice("s-t", "nA", 0, "GPU-0", 40))
    agent = ctl.sessions.by_node["nA"] = Agent("nA", ctl, mm, {"s-x": "GPU-0", "s-t": "GPU-0"})
    await mm._commit_idle_resize(m)
    assert mm.migrations[MID].phase == P.MIGRATION_PHASE_COMMITTED
    assert ctl.fleet.slices["s-t"].memory_bytes == 30 << 30       # the old placement, under the reserved ID
    return ctl, mm, agent


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_preemption_of_the_old_placement_waits_for_the_resize_and_then_allocates():
    async def main():
        ctl, mm, agent = await _committed()
        # 10 GiB free: 35 GiB fits only once a priority-0 allocation goes (the old placement, 30 GiB, first)
        req = slicespec.validate(T.SliceSpec(tenant="t2", gpu_model="A100-80GB", isolation=T.ISOLATION_MPS,
                                             memory_bytes=35 << 30, compute_share=0.1, priority=10, preempt=True))
        alloc = asyncio.create_task(ctl.allocate(req, no_wait=True))
        await _turns()
        assert not alloc.done(), alloc.exception()      # waiting for the resize, not refused
        mm._spawn(MID)                                  # the resize finishes: swap, release of the old placement
        _, placed = await asyncio.wait_for(alloc, 30)
        await asyncio.wait_for(mm.tasks.get(MID) or asyncio.sleep(0), 30)
        await _turns()
        assert placed[0].memory_bytes == 35 << 30 and placed[0].node == "nA"
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
        assert "s-t" not in ctl.fleet.slices and agent.removed == ["s-t"]
        x = ctl.fleet.slices["s-x"]
        assert (x.state, x.memory_bytes) == (T.SLICE_STATE_READY, 40 << 30)
    asyncio.run(main())


def test_a_preemption_that_meets_a_resize_that_does_not_end_fails_without_naming_it():
    async def main():
        ctl, mm, agent = await _committed()
        ctl.evict_wait = 0.05
        req = slicespec.validate(T.SliceSpec(tenant="t2", gpu_model="A100-80GB", isolation=T.ISOLATION_MPS,
                                             memory_bytes=35 << 30, compute_share=0.1, priority=10, preempt=True))
        try:
            await ctl.allocate(req, no_wait=True)
        except Exception as e:  # noqa: BLE001 - asserted below
            err = e
        else:
            raise AssertionError("allocated over a slice not released")
        assert isinstance(err, errors.Unavailable) and "resized" in str(err), err     # retry later
        assert "s-t" not in str(err) and "s-x" not in str(err) and MID not in str(err)    # another tenant's
        assert set(ctl.fleet.slices) == {"s-x", "s-t"}      # nothing placed, nothing released
        assert ctl.fleet.slices["s-t"].state == T.SLICE_STATE_READY
    asyncio.run(main())


def test_a_drain_evicts_the_rest_then_waits_for_the_resize_of_the_old_placement():
    async def main():
        other = _slice("s-o", "nA", 0, "GPU-0", 5)
        ctl, mm, agent = await _committed([other])
        nm = nodes_mod.NodeManager(ctl)
        drain = asyncio.create_task(nm.drain("nA", False))
        await _turns()
        assert not drain.done(), drain.exception()
        # the others are evicted meanwhile: s-o at once, s-x (the client's) with its removal held for the swap
        assert ctl.fleet.slices.get("s-o") is None or ctl.fleet.slices["s-o"].state == T.SLICE_STATE_RELEASING
        assert ctl.fleet.slices["s-x"].state == T.SLICE_STATE_RELEASING
        assert ctl.fleet.slices["s-t"].state == T.SLICE_STATE_READY
        mm._spawn(MID)
        _, evicted, _ = await asyncio.wait_for(drain, 30)
        await asyncio.wait_for(mm.tasks.get(MID) or asyncio.sleep(0), 30)
        await _turns()
        assert {"s-o", "s-x"} <= {s.id for s in evicted}
        assert mm.migrations[MID].phase == P.MIGRATION_PHASE_DONE
        assert ctl.fleet.slices == {} and agent.held == {}
        assert sorted(agent.removed) == ["s-o", "s-t", "s-x"]
    asyncio.run(main())


def test_a_drain_skips_an_allocation_released_and_gone_while_it_evicts_the_others():
    """The drain lists the node's allocations, then evicts them one by one (each release awaits its workloads'
    stops, after the migration pass); a tenant's own release of a later one, gone by its turn, made the whole drain
    fail NOT_FOUND half way (the rest not evicted, the operator told the drain failed). It is skipped."""
    async def main():
        ctl = _controller(NODES)
        for s in (_slice("s-a", "nA", 0, "GPU-0", 5), _slice("s-b", "nA", 0, "GPU-0", 5),
                  _slice("s-c", "nA", 0, "GPU-0", 5)):
            s.allocation_id = "a-" + s.id
            ctl.fleet.put_slice(s)
        release = ctl.release

        async def release_then_tenant_releases_b(ident, *a, **kw):
            out = await release(ident, *a, **kw)
            ctl.fleet.drop_slice("s-b")         # its tenant released it meanwhile, and its agent removed it
            return out
        ctl.release = release_then_tenant_releases_b
        _, evicted, _ = await asyncio.wait_for(nodes_mod.NodeManager(ctl).drain("nA", False), 30)
        assert {s.id for s in evicted} == {"s-a", "s-c"}
        assert ctl.fleet.slices["s-c"].state == T.SLICE_STATE_RELEASING
    asyncio.run(main())


def test_a_preemption_whose_second_victim_is_released_meanwhile_allocates_without_naming_it():
    """A preemption evicts its victims one by one (each eviction awaits); a later victim released by its own
    tenant meanwhile and gone failed the allocation NOT_FOUND, naming the other tenant's allocation, though the
    room it was to make was free. A victim gone is room made: skipped."""
    async def main():
        from controlplane.controllers.evictions import preempt
        ctl = _controller(NODES)
        for s in (_slice("s-a", "nA", 0, "GPU-0", 5), _slice("s-b", "nA", 0, "GPU-0", 5)):
            s.allocation_id, s.tenant = "a-" + s.id, "other"
            ctl.fleet.put_slice(s)
        release = ctl.release

        async def release_then_b_goes(ident, *a, **kw):
            out = await release(ident, *a, **kw)
            ctl.fleet.drop_slice("s-b")
            return out
        ctl.release = release_then_b_goes
        req = T.SliceSpec(tenant="t2", priority=10)
        await asyncio.wait_for(preempt(ctl, ["a-s-a", "a-s-b"], "a-new", req), 30)
        assert ctl.fleet.slices["s-a"].state == T.SLICE_STATE_RELEASING and "s-b" not in ctl.fleet.slices
    asyncio.run(main())
