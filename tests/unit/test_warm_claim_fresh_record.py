"""An Allocate that claims a warm slice writes the slice's record as it is when the write is queued, against a real
etcd with the real writer. With a request id, the claim awaits the request keys' etcd lease (granted at the first
one, then once an hour) between putting the claimed record in the fleet and saving it; a change of the slice
meanwhile (its node lost, its GPU's health) is written first, from the fleet's record. The claim used to write its
own copy after it, undoing that change in etcd while the fleet kept it."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.controllers.warmslices import WarmPool
from controlplane.state import keys
from gpumesh.v1 import node_service_pb2 as N
from gpumesh.v1 import types_pb2 as T
from mesh import errors, gpumodels
from mesh.slicespec import validate
from tests.unit._leader import leader_controller


@pytest.fixture
async def world(etcd_server, etcd_client):
    """A leader over etcd with one warm 1g.10gb slice, READY, on node nA's H100 (MIG mode)."""
    async with leader_controller(etcd_server, "warm-claim-fresh-record-test") as ctl:
        h100 = gpumodels.get_model("H100-80GB")
        inv = T.NodeInventory(hostname="nA")
        inv.gpus.add(index=0, uuid="GPU-0", model=h100.name, memory_bytes=h100.memory_mib << 20, mig_enabled=True)
        ctl.fleet.upsert_node(T.Node(name="nA", inventory=inv)).ready = True
        ctl.warm = WarmPool(ctl)
        made = await asyncio.wait_for(ctl.warm.create("1g.10gb/H100-80GB", 1, "test"), 20)
        await asyncio.wait_for(ctl.report("nA", False, [N.SliceStatus(slice_id=made[0].id, state=T.SLICE_STATE_READY,
                                                                      device_uuid="MIG-1")], []), 20)
        yield ctl, made[0].id


async def test_a_change_made_while_the_claim_awaits_its_lease_is_kept(world, etcd_client):
    ctl, sid = world
    assert ctl.fleet.slices[sid].state == T.SLICE_STATE_READY
    req = validate(T.SliceSpec(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB"))
    allocate = asyncio.create_task(ctl.allocate(req, request_id="r-1", no_wait=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while sid not in ctl.warm.prior:      # claimed in the fleet; the request key's lease is being granted
        assert not allocate.done() and loop.time() < deadline, "the claim did not start"
        await asyncio.sleep(0)
    await asyncio.wait_for(ctl.mark_node_lost("nA", "lease expired"), 20)
    alloc_id, slices = await asyncio.wait_for(allocate, 20)
    kv = await etcd_client.get(keys.slice_(sid))
    rec = T.Slice.FromString(kv.value)
    assert (rec.tenant, rec.allocation_id) == ("team-a", alloc_id)
    assert rec.state == T.SLICE_STATE_UNKNOWN and "node NotReady" in rec.message, rec
    assert ctl.fleet.slices[sid] == rec and slices[0] == rec


async def test_a_claim_whose_slice_was_deleted_while_it_awaited_its_lease_does_not_bring_it_back(world, etcd_client):
    """The claimed slice's node deleted while the claim awaits the request keys' lease: its records are released
    and deleted (end_node_slices), the claim's write is refused (the record is gone), and the failed claim used to
    put the warm slice back in the fleet: a slice that etcd no longer has, on a deleted node, counted on its GPU
    and claimable again. Now what etcd has (nothing) stays."""
    ctl, sid = world
    granted = asyncio.Event()
    real_lease = ctl._request_lease

    async def held_lease() -> int:
        await granted.wait()
        return await real_lease()
    ctl._request_lease = held_lease
    req = validate(T.SliceSpec(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB"))
    allocate = asyncio.create_task(ctl.allocate(req, request_id="r-2", no_wait=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while sid not in ctl.warm.prior:      # claimed in the fleet; the request key's lease is held
        assert not allocate.done() and loop.time() < deadline, "the claim did not start"
        await asyncio.sleep(0)
    await asyncio.wait_for(ctl.end_node_slices("nA", "node deleted"), 20)
    assert sid not in ctl.fleet.slices and await etcd_client.get(keys.slice_(sid)) is None
    granted.set()
    with pytest.raises(errors.Aborted):     # the record it was claimed from is gone
        await asyncio.wait_for(allocate, 20)
    assert await etcd_client.get(keys.slice_(sid)) is None
    assert sid not in ctl.fleet.slices, ctl.fleet.slices.get(sid)
    assert ctl.fleet.gpu("nA", 0).allocated_memory == 0


async def test_a_failed_claim_whose_record_another_change_wrote_gives_the_slice_back_to_the_pool(world, etcd_client):
    """The claimed slice's node lost while the claim awaits the request keys' lease: that change, built on the
    claimed record (the tenant's, a new allocation id), is written; then the lease cannot be granted and the
    Allocate fails. The put-back kept what etcd had: the slice stayed the tenant's, under an allocation it was
    never told of (counted against its quota, never released by it). Now the claim is undone in that record
    too: the slice is warm again, with the node-lost change kept."""
    ctl, sid = world
    warm_alloc = ctl.fleet.slices[sid].allocation_id
    granted = asyncio.Event()

    async def failing_lease() -> int:
        await granted.wait()
        raise errors.Unavailable("etcd: cannot grant the lease for request keys: test")
    ctl._request_lease = failing_lease
    req = validate(T.SliceSpec(tenant="team-a", mig_profile="1g.10gb", gpu_model="H100-80GB"))
    allocate = asyncio.create_task(ctl.allocate(req, request_id="r-3", no_wait=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while sid not in ctl.warm.prior:      # claimed in the fleet; the request key's lease is held
        assert not allocate.done() and loop.time() < deadline, "the claim did not start"
        await asyncio.sleep(0)
    await asyncio.wait_for(ctl.mark_node_lost("nA", "lease expired"), 20)
    assert T.Slice.FromString((await etcd_client.get(keys.slice_(sid))).value).tenant == "team-a"
    granted.set()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(allocate, 20)
    rec = T.Slice.FromString((await etcd_client.get(keys.slice_(sid))).value)
    assert (rec.tenant, rec.allocation_id) == ("", warm_alloc), rec
    assert rec.labels.get("gpumesh.io/warm") == "true" and rec.state == T.SLICE_STATE_UNKNOWN, rec
    assert ctl.fleet.slices[sid] == rec
    assert not [x.id for x in ctl.fleet.slices.values() if x.tenant == "team-a"]
    assert sid not in ctl.warm.prior
