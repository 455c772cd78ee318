"""A slice change whose write fails leaves the fleet as etcd has it, also when another change was built on it
meanwhile (controllers/slices.py `save_or_restore`, `_put_back`), against a real etcd and the real writer: the
writer commits two writes of one key in order, in transactions of their own, so the first can fail (etcd
unavailable for a moment) and the second, carrying the first's fields, be taken. The first one's caller put its
prior back over the second's record: the fleet said READY where etcd said RELEASING (the agent's release report
then found no RELEASING slice to delete). A write that timed out but was applied is read back too."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.slices import Controller
from controlplane.state import keys
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from mesh import errors
from tests.unit._leader import leader_controller


@pytest.fixture
async def ctl(etcd_server, etcd_client):
    async with leader_controller(etcd_server, "slice-write-races-test") as c:
        c.fleet.upsert_node(T.Node(name="nA", inventory=T.NodeInventory(
            hostname="nA", gpus=[T.Gpu(index=0, uuid="GPU-a", model="H100-80GB")]))).ready = True
        s = T.Slice(id="s-1", node="nA", gpu_uuid="GPU-a", tenant="t", allocation_id="a-1", isolation=T.ISOLATION_MPS,
                    memory_bytes=1 << 30, compute_share=0.1, state=T.SLICE_STATE_PENDING)
        await etcd_client.put(keys.slice_(s.id), s.SerializeToString())
        c.fleet.put_slice(s)
        yield c


def fail_commits(ctl: Controller, which: set[int], applied: bool = False) -> None:
    """The store's commits numbered in `which` (from 1) fail with UNAVAILABLE (after being applied: `applied`)."""
    commit, count = ctl.store.commit, [0]

    async def flaky(ops, conds=()):
        count[0] += 1
        if count[0] in which:
            if applied:
                await commit(ops, conds)
            raise errors.Unavailable("etcd: deadline exceeded")
        return await commit(ops, conds)
    ctl.store.commit = flaky


async def in_etcd(etcd_client) -> T.Slice:
    return T.Slice.FromString((await etcd_client.get(keys.slice_("s-1"))).value)


def ready() -> list:
    return [N.SliceStatus(slice_id="s-1", state=T.SLICE_STATE_READY, device_uuid="GPU-a", message="ready")]


async def test_a_failed_report_write_does_not_undo_a_release_built_on_it_that_etcd_took(ctl, etcd_client):
    fail_commits(ctl, {1})
    report = asyncio.ensure_future(ctl.report("nA", False, ready(), []))
    release = asyncio.ensure_future(ctl.release("s-1", wait=False))     # built on the report's READY record
    out = await asyncio.wait_for(asyncio.gather(report, release, return_exceptions=True), 30)
    assert isinstance(out[0], errors.Unavailable) and not isinstance(out[1], BaseException)
    etcd = await in_etcd(etcd_client)
    assert (etcd.state, etcd.device_uuid) == (T.SLICE_STATE_RELEASING, "GPU-a")
    assert ctl.fleet.slices["s-1"] == etcd                                 # was the report's prior: PENDING


async def test_two_failed_writes_of_one_slice_leave_it_as_etcd_has_it(ctl, etcd_client):
    fail_commits(ctl, {1, 2})
    report = asyncio.ensure_future(ctl.report("nA", False, ready(), []))
    release = asyncio.ensure_future(ctl.release("s-1", wait=False))
    out = await asyncio.wait_for(asyncio.gather(report, release, return_exceptions=True), 30)
    assert all(isinstance(e, errors.Unavailable) for e in out)
    assert ctl.fleet.slices["s-1"] == await in_etcd(etcd_client)         # was the release's prior: the READY one
    assert ctl.fleet.slices["s-1"].state == T.SLICE_STATE_PENDING


async def test_a_write_that_failed_after_etcd_applied_it_leaves_the_fleet_as_etcd_has_it(ctl, etcd_client):
    fail_commits(ctl, {1}, applied=True)
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(ctl.release("s-1", wait=False), 30)
    assert (await in_etcd(etcd_client)).state == T.SLICE_STATE_RELEASING
    assert ctl.fleet.slices["s-1"].state == T.SLICE_STATE_RELEASING      # was the prior: PENDING
    assert await asyncio.wait_for(ctl.release("s-1", wait=False), 30)   # a retry finds it released
