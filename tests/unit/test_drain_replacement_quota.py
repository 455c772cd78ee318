"""A deployment's replicas on a drained node are replaced in a full pool or at a full tenant quota.

A drain leaves a deployment's replicas to the deployment controller, which creates a replacement for each
elsewhere before it removes the old one (controlplane/serving/reconcile.py `_drain`). The replacements were
ordinary allocations: a pool or a tenant quota exactly full with the deployment's replicas refused them
("PoolExhausted: pool "p" quota max_slices=2 reached"), and the old replicas kept serving on the drained node for
ever (the Draining condition said NoRoomForReplacement). Now each replacement's slice is tied to one old replica's
slice (label `gpumesh.replaces`, as a migration's target is: controlplane/state/drainpairs.py) and the pair counts
once while the old one is on a draining node; once the old one is released the replacement counts alone, so the
usage ends where it began. These run the actuator's real allocation and removal through the real slice controller
and scheduler (its Pool and TenantQuota plugins) over an in-memory fleet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.api.services import SliceService
from controlplane.scheduler import profiles
from controlplane.serving import deployspec
from controlplane.serving.actuator import Actuator
from controlplane.serving.deploystore import DeploymentStore
from controlplane.state.fleet import Fleet
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from gpumesh.v1 import pool_service_pb2 as PP
from gpumesh.v1 import slice_service_pb2 as SS
from gpumesh.v1 import types_pb2 as T
from mesh import errors, pools, replacing, slicespec
from mesh.cost import PriceTable
from tests.unit.test_deploy_actuator import controller
from tests.unit.test_deployment_requests import Aborted as Refused, Context
from tests.unit.test_tenant_boundaries import as_tenant

GiB = 1 << 30
NEED = 2 * GiB
PRICES = PriceTable()
SPEC = D.DeploymentSpec(name="chat", tenant="acme", model="smol", pool="p")
# (which quota, its limit) - each set at exactly what the deployment's two replicas take
LIMITS = [("pool", "max_slices"), ("pool", "max_memory_bytes"), ("pool", "max_gpus"),
          ("tenant", "max_slices"), ("tenant", "max_memory_bytes"), ("tenant", "max_gpus")]


def set_limits(ctl, pool_quota: dict, tenant_quota: dict) -> None:
    fw = profiles.from_config({"args": {"TenantQuota": {"tenants": {"acme": tenant_quota}}}})
    fw.plugin("Pool").set_pools({"p": pools.validate(PP.Pool(name="p", quota=PP.PoolQuota(**pool_quota)))}, PRICES)
    ctl.scheduler = fw


def usage(fleet) -> tuple:
    """(the pool's slices, memory, GPUs; the tenant's slices, memory, GPUs) as the quotas count them."""
    u = pools.usage("p", fleet.slices.values(), PRICES, fleet.replaced)
    n, memory, gpus = fleet.tenant_usage("acme")
    return u.slices, u.memory_bytes, round(u.gpus, 6), n, memory, round(gpus, 6)


async def full_world(which: str, limit: str):
    """Deployment "chat" of tenant acme with two replicas (r-0, r-1) on n1, in pool p; n2 empty; the pool's or the
    tenant's `limit` at exactly what the two take; n1 then drained. Returns (ctl, actuator, store, old replicas,
    the usage before the drain)."""
    ctl = controller("n1", "n2")
    ctl.fleet.nodes["n2"].ready = False                 # both old replicas on n1
    set_limits(ctl, {}, {})
    store = DeploymentStore(ctl)
    act = Actuator(ctl, SimpleNamespace(workloads={}), store)
    old = [await act.allocate(D.Replica(id=f"r-{i}", deployment="chat"), SPEC, NEED) for i in range(2)]
    assert {r.node for r in old} == {"n1"}
    ctl.fleet.nodes["n2"].ready = True
    before = usage(ctl.fleet)
    figures = {"pool": dict(zip(("max_slices", "max_memory_bytes", "max_gpus"), before[:3])),
               "tenant": dict(zip(("max_slices", "max_memory_bytes", "max_gpus"), before[3:]))}
    set_limits(ctl, {limit: figures["pool"][limit]} if which == "pool" else {},
               {limit: figures["tenant"][limit]} if which == "tenant" else {})
    extra = D.Replica(id="r-extra", deployment="chat")
    with pytest.raises(errors.ResourceExhausted):       # full: one more replica is refused
        await act.allocate(extra, SPEC, NEED)
    await store.delete_replica(store.replicas["chat"]["r-extra"])
    rec = T.Node()
    rec.CopyFrom(ctl.fleet.nodes["n1"].record)
    rec.cordoned = rec.draining = True                  # meshctl drain n1 (NodeManager.drain)
    ctl.fleet.upsert_node(rec)
    return ctl, act, store, old, before


@pytest.mark.parametrize("which,limit", LIMITS)
async def test_a_full_pools_replicas_on_a_drained_node_are_replaced_and_usage_ends_the_same(which, limit):
    ctl, act, store, old, before = await full_world(which, limit)
    fleet = ctl.fleet
    # the deployment controller's replacements (reconcile `_drain`: one per draining replica); refused before
    new = [await act.allocate(D.Replica(id=f"r-{i}", deployment="chat"), SPEC, NEED) for i in (2, 3)]
    assert {r.node for r in new} == {"n2"}
    tied = sorted(replacing.source_id(fleet.slices[r.slice_id].labels) for r in new)
    assert tied == sorted(r.slice_id for r in old)      # each tied to exactly one old replica's slice
    assert usage(fleet) == before                       # each pair counts once: still at the limit, not over it
    with pytest.raises(errors.ResourceExhausted):       # and no room opened for anything else
        await act.allocate(D.Replica(id="r-more", deployment="chat"), SPEC, NEED)
    await store.delete_replica(store.replicas["chat"]["r-more"])
    # the replacements READY, the old replicas removed (reconcile's "node drained: replaced elsewhere")
    for r in old:
        await act.remove(store.replicas["chat"][r.id], "node drained: replaced elsewhere")
        assert fleet.slices[r.slice_id].state == T.SLICE_STATE_RELEASING
        assert usage(fleet) == before                   # being released: still once
        fleet.drop_slice(r.slice_id)                    # its agent removed it
        assert usage(fleet) == before                   # gone: the replacement counts alone, no credit left over
    assert sorted(store.replicas["chat"]) == ["r-2", "r-3"]
    with pytest.raises(errors.ResourceExhausted):       # no quota leaked: still full
        await act.allocate(D.Replica(id="r-after", deployment="chat"), SPEC, NEED)


async def test_the_pairs_are_read_from_the_records_so_a_new_leader_counts_them_the_same():
    """A leader change mid-drain: a fleet rebuilt from the slice and node records alone (no migration manager, no
    memory of the old leader's) counts the placed pair once, and the new leader's replacement for the other old
    replica ties to the one slice left unclaimed."""
    ctl, act, store, old, before = await full_world("pool", "max_slices")
    first = await act.allocate(D.Replica(id="r-2", deployment="chat"), SPEC, NEED)
    new = controller("n1", "n2")
    new.fleet = Fleet()
    for e in ctl.fleet.nodes.values():
        rec = T.Node()
        rec.CopyFrom(e.record)
        new.fleet.upsert_node(rec).ready = True
    for s in ctl.fleet.slices.values():
        copy = T.Slice()
        copy.CopyFrom(s)
        new.fleet.put_slice(copy)
    assert new.fleet.reservation_live is None and usage(new.fleet) == before
    new.scheduler = ctl.scheduler
    store2 = DeploymentStore(new)
    store2.replicas = {"chat": dict(store.replicas["chat"])}
    second = await Actuator(new, SimpleNamespace(workloads={}), store2).allocate(
        D.Replica(id="r-3", deployment="chat"), SPEC, NEED)
    tied = {replacing.source_id(new.fleet.slices[r.slice_id].labels) for r in (first, second)}
    assert tied == {r.slice_id for r in old} and usage(new.fleet) == before


async def test_a_drain_called_off_counts_both():
    ctl, act, store, old, before = await full_world("pool", "max_slices")
    fleet = ctl.fleet
    await act.allocate(D.Replica(id="r-2", deployment="chat"), SPEC, NEED)
    assert usage(fleet) == before
    rec = T.Node()
    rec.CopyFrom(fleet.nodes["n1"].record)
    rec.cordoned = rec.draining = False                 # meshctl uncordon n1: the old replica stays, so both count
    fleet.upsert_node(rec)
    assert usage(fleet)[0] == before[0] + 1 and usage(fleet)[3] == before[3] + 1


def forged(source: T.Slice, **labels) -> slicespec.SliceRequest:
    """A request like a replacement replica's of deployment "chat", naming `source` as the slice it replaces."""
    spec = deployspec.slice_spec(SPEC, NEED, "r-forged", spread=False)
    spec.labels.update(labels)
    req = slicespec.validate(spec)
    return slicespec.SliceRequest(**{**req.__dict__, "labels": {**req.labels, replacing.REPLACES: source.id}})


async def test_only_a_replacement_of_another_replica_of_the_deployment_on_a_draining_node_gets_credit():
    """`gpumesh.replaces` is set by gpumesh alone; even a request that carries it (an admin's by hand) counts once
    with its source only as a drain's replacement: the source on a draining node, of the same deployment, another
    replica, and not claimed by another slice already (one old slice never lends its room twice)."""
    ctl, act, store, old, before = await full_world("pool", "max_slices")
    fleet = ctl.fleet
    src = fleet.slices[min(r.slice_id for r in old)]       # the old slice the next replacement ties to
    assert fleet.replaced(forged(src)) is src
    assert fleet.replaced(forged(src, **{deployspec.LABEL_DEPLOYMENT: "other"})) is None
    assert fleet.replaced(forged(src, **{deployspec.LABEL_REPLICA: src.labels[deployspec.LABEL_REPLICA]})) is None
    assert fleet.replaced(slicespec.SliceRequest(**{**forged(src).__dict__, "tenant": "intruder"})) is None
    first = await act.allocate(D.Replica(id="r-2", deployment="chat"), SPEC, NEED)
    assert replacing.source_id(fleet.slices[first.slice_id].labels) == src.id
    assert fleet.replaced(forged(src)) is None                              # claimed: no second credit
    assert fleet.replaced(fleet.slices[first.slice_id]) is src
    twin = T.Slice()                                        # a second slice naming the same source: no credit
    twin.CopyFrom(fleet.slices[first.slice_id])
    twin.id, twin.allocation_id, twin.labels[deployspec.LABEL_REPLICA] = "s-zzz", "a-zzz", "r-9"
    fleet.put_slice(twin)
    assert fleet.replaced(twin) is None and fleet.replaced(fleet.slices[first.slice_id]) is src
    assert usage(fleet)[0] == before[0] + 1
    rec = T.Node()
    rec.CopyFrom(fleet.nodes["n1"].record)
    rec.draining = False                                    # not (or no longer) being drained: no credit
    fleet.upsert_node(rec)
    assert fleet.replaced(fleet.slices[first.slice_id]) is None


async def test_a_tenant_cannot_set_the_label_itself():
    assert replacing.REPLACES in slicespec.SYSTEM_LABELS
    ctl = controller("n1")
    spec = T.SliceSpec(tenant="acme", memory_bytes=NEED, labels={replacing.REPLACES: "s-1"})
    with as_tenant("acme"), pytest.raises(Refused) as e:
        await SliceService(ctl).Allocate(SS.AllocateRequest(spec=spec), Context())
    assert "gpumesh.replaces" in str(e.value) and not ctl.fleet.slices
    with pytest.raises(errors.InvalidArgument, match="gpumesh.replaces"):
        deployspec.check_settings(D.DeploymentSpec(name="chat", model="smol", labels={replacing.REPLACES: "s-1"}),
                                  M.Variant(name="f16", backend=M.BACKEND_LLAMA_CPP, max_context=256))
