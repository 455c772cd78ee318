"""An Allocate that waits for its slices answers ABORTED when the allocation is released before it is ready (a
Release, a preemption, its node drained or deleted: controllers/slices.py `_gather`). Before, the waiters of a
slice set RELEASING were not woken (the call waited its whole timeout, then said the allocation "stays PENDING"),
and slices deleted meanwhile were left out of the answer: a partial or empty slice list came back as the
allocation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

import grpc
import pytest

from controlplane.controllers.slices import Controller
from gpumesh.v1 import types_pb2 as T
from mesh import errors, slicespec


def _controller() -> Controller:
    ctl = Controller(store=None)
    for n in ("n1", "n2"):
        ctl.fleet.upsert_node(T.Node(name=n, inventory=T.NodeInventory(
            gpus=[T.Gpu(index=0, uuid=f"GPU-{n}", model="A100-80GB")])))

    def choice(node):
        return NS(node=node, gpu_uuid=f"GPU-{node}", gpu_index=0, gpu_model="A100-80GB", isolation="mps", profile="",
                  memory_bytes=1 << 30, compute_share=0.1, start=0, size=0, cpu_milli=0, host_memory_bytes=0)
    ctl.scheduler = NS(schedule=lambda req, fleet: NS(ok=True, choices=[choice("n1"), choice("n2")], victims=[]))

    async def write(ops, conds=()):
        return 7
    ctl.writer.write = write
    return ctl


def _gang() -> slicespec.SliceRequest:
    return slicespec.validate(T.SliceSpec(tenant="t", memory_bytes=1 << 30, isolation=T.ISOLATION_MPS, count=2))


async def _waiting(ctl: Controller) -> tuple[asyncio.Task, str]:
    call = asyncio.create_task(ctl.allocate(_gang(), timeout=30))
    for _ in range(100):
        await asyncio.sleep(0)
        if len(ctl.fleet.slices) == 2:
            break
    assert not call.done()
    return call, next(iter(ctl.fleet.slices.values())).allocation_id


async def test_a_release_while_allocate_waits_answers_aborted_at_once():
    ctl = _controller()
    call, alloc = await _waiting(ctl)
    await ctl.release(alloc, wait=False, message="preempted by a-urgent")
    with pytest.raises(errors.Aborted) as e:
        await asyncio.wait_for(call, 5)          # at once, not after the 30 s wait
    assert e.value.code == grpc.StatusCode.ABORTED
    assert f"allocation {alloc} was released before it was ready: preempted by a-urgent" in e.value.message
    assert "new request_id" in e.value.message


async def test_a_deleted_node_ends_the_wait_with_aborted_not_a_partial_allocation():
    ctl = _controller()
    call, alloc = await _waiting(ctl)
    ids, allocs = await ctl.end_node_slices("n2", "node n2 deleted")
    assert allocs == [alloc]
    with pytest.raises(errors.Aborted, match=f"allocation {alloc} was released before it was ready: node n2 deleted"):
        await asyncio.wait_for(call, 5)


async def test_an_allocation_that_becomes_ready_is_answered_whole():
    ctl = _controller()
    call, alloc = await _waiting(ctl)
    for s in list(ctl.fleet.slices.values()):
        ready = T.Slice()
        ready.CopyFrom(s)
        ready.state = T.SLICE_STATE_READY
        ctl.fleet.put_slice(ready)
        await ctl.save([ready])
    got = await asyncio.wait_for(call, 5)
    assert got[0] == alloc and sorted(s.node for s in got[1]) == ["n1", "n2"]
    assert all(s.state == T.SLICE_STATE_READY for s in got[1])
