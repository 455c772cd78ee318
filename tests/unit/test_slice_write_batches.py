"""A node's many slices changed at once (NotReady, a full report, a deletion) are written SAVE_BATCH a transaction
(controllers/slices.py `save_or_restore`), against a real etcd and the real writer: one transaction of a put per
slice went past etcd's 128 operations for a node with more than 128 MPS or time-share slices, was refused every
time, and the node's slices were never marked lost."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.slices import SAVE_BATCH
from controlplane.state import keys
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit._leader import leader_controller

COUNT = 150


@pytest.fixture
async def ctl(etcd_server, etcd_client):
    async with leader_controller(etcd_server, "slice-batches-test") as c:
        c.fleet.upsert_node(T.Node(name="nA", inventory=T.NodeInventory(
            hostname="nA", gpus=[T.Gpu(index=0, uuid="GPU-a", model="H100-80GB")]))).ready = True
        for i in range(COUNT):
            s = T.Slice(id=f"s-{i:03d}", node="nA", gpu_uuid="GPU-a", tenant="t", allocation_id=f"a-{i:03d}",
                        isolation=T.ISOLATION_MPS, memory_bytes=1 << 28, compute_share=0.005,
                        state=T.SLICE_STATE_READY)
            await etcd_client.put(keys.slice_(s.id), s.SerializeToString())
            c.fleet.put_slice(s)
        yield c


async def _states(etcd_client) -> list[int]:
    res = await etcd_client.get_prefix(keys.SLICES.encode())
    return [T.Slice.FromString(kv.value).state for kv in res.kvs]


async def test_a_node_with_many_slices_is_marked_lost_in_batches(ctl, etcd_client):
    await asyncio.wait_for(ctl.mark_node_lost("nA", "lease expired"), 60)
    states = await _states(etcd_client)
    assert len(states) == COUNT and set(states) == {T.SLICE_STATE_UNKNOWN}
    assert {s.state for s in ctl.fleet.slices.values()} == {T.SLICE_STATE_UNKNOWN}


async def test_a_failed_batch_puts_back_its_slices_and_the_later_ones(ctl, etcd_client):
    real, calls = ctl.save, []

    async def second_fails(changed, deleted=(), **kw):
        calls.append(len(changed))
        if len(calls) == 2:
            raise errors.Unavailable("etcd: injected")
        return await real(changed, deleted, **kw)
    ctl.save = second_fails
    with pytest.raises(errors.Unavailable):
        await ctl.mark_node_lost("nA", "lease expired")
    assert calls == [SAVE_BATCH, SAVE_BATCH]
    fleet = sorted(ctl.fleet.slices.values(), key=lambda s: s.id)
    assert [s.state for s in fleet] == [T.SLICE_STATE_UNKNOWN] * SAVE_BATCH + [T.SLICE_STATE_READY] * (COUNT - SAVE_BATCH)
    assert sorted(await _states(etcd_client)) == sorted(s.state for s in fleet)       # memory as etcd has it


async def test_a_later_batch_does_not_undo_a_release_written_during_an_earlier_one(ctl, etcd_client):
    """A slice of a later batch changed again while an earlier batch was awaited (its allocation released: its
    RELEASING record built on this change and written first) is left to that change: the later batch wrote the
    older record over RELEASING, and a restart brought the released allocation back."""
    last = f"s-{COUNT - 1:03d}"
    lost = asyncio.create_task(ctl.mark_node_lost("nA", "lease expired"))
    release = asyncio.create_task(ctl.release(f"a-{COUNT - 1:03d}", wait=False))
    await asyncio.wait_for(asyncio.gather(lost, release), 60)
    assert ctl.fleet.slices[last].state == T.SLICE_STATE_RELEASING
    kv = await etcd_client.get(keys.slice_(last))
    assert T.Slice.FromString(kv.value).state == T.SLICE_STATE_RELEASING      # as the fleet has it
    states = await _states(etcd_client)
    assert states.count(T.SLICE_STATE_UNKNOWN) == COUNT - 1
