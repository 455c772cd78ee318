"""A move counts once against its pool and its tenant's quota.

A migration (`meshctl migrate`, a drain's moves, `meshctl recommend --apply` packing) and a resize by migration
allocate their target slice while the source still exists. Both used to count: a tenant at its pool's or its
tenants-file quota had every such move refused by the scheduler ("PoolExhausted: pool ... quota max_slices=1
reached", "tenant t quota max_slices=1 exceeded"), so a drain of its node could only evict its workloads. Now the
target is a reservation for the source (label `gpumesh.replaces`): while the move is unfinished the pair counts
once, at the larger of the two, so a move to an equal slice always fits, a resize's growth must still fit, and a
new allocation meanwhile is still refused. These tests run the migration's real placement (`StepsMixin._place`)
against the real scheduler framework and fleet."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.controllers.migration_phases import P as PH
from controlplane.controllers.migration_steps import StepsMixin
from controlplane.scheduler import profiles
from controlplane.state.fleet import Fleet
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import pool_service_pb2 as PP
from gpumesh.v1 import types_pb2 as T
from mesh import errors, pools, slicespec
from mesh.cost import PriceTable

GiB = 1 << 30
PRICES = PriceTable()


def cluster(pool_quota: dict | None = None, tenant_quota: dict | None = None):
    """Two H100 nodes (no MIG), the default scheduler profile with a pool `p` and tenant `t`'s quota, and tenant
    `t`'s one slice in the pool on n1 (8 GiB MPS, half a GPU): at each limit given."""
    fleet = Fleet()
    for name in ("n1", "n2"):
        inv = T.NodeInventory(cpu_milli=8000, memory_bytes=64 * GiB, gpus=[
            T.Gpu(index=0, uuid=f"GPU-{name}", model="H100-80GB", memory_bytes=80 * GiB)])
        fleet.upsert_node(T.Node(name=name, inventory=inv))
        fleet.nodes[name].ready = True
    fw = profiles.from_config({"args": {"TenantQuota": {"tenants": {"t": tenant_quota or {}}}}})
    fw.plugin("Pool").set_pools({"p": pools.validate(PP.Pool(name="p", quota=PP.PoolQuota(**(pool_quota or {}))))},
                                PRICES)
    src = T.Slice(id="s-src", allocation_id="a-src", tenant="t", node="n1", gpu_index=0, gpu_model="H100-80GB",
                  isolation=T.ISOLATION_MPS, memory_bytes=8 * GiB, compute_share=0.5, state=T.SLICE_STATE_READY,
                  labels={pools.LABEL: "p"})
    fleet.put_slice(src)
    return fleet, fw, src


class Steps(StepsMixin):
    """The migration manager's placement over a controller whose `allocate` runs the real scheduler."""

    def __init__(self, fleet, fw) -> None:
        self.migrations: dict[str, M.Migration] = {}
        self.planning: dict[str, M.Migration] = {}
        n = [0]

        async def allocate(req, no_wait=False):
            d = fw.schedule(req, fleet)
            if not d.ok:
                raise errors.ResourceExhausted(f"no room: {d.reasons}")
            n[0] += 1
            out = []
            for c in d.choices:
                s = T.Slice(id=f"s-{n[0]}", allocation_id=f"a-{n[0]}", tenant=req.tenant, node=c.node,
                            gpu_index=c.gpu_index, gpu_model="H100-80GB", isolation=T.ISOLATION_MPS,
                            memory_bytes=c.memory_bytes, compute_share=c.compute_share,
                            state=T.SLICE_STATE_READY, labels=dict(req.labels))
                fleet.put_slice(s)
                out.append(s)
            return f"a-{n[0]}", out

        async def await_ready(alloc_id, no_wait, timeout):
            return fleet.slices_of(alloc_id)

        async def release(sid, wait=False, message=""):
            fleet.drop_slice(sid)
        self.ctl = SimpleNamespace(fleet=fleet, allocate=allocate, _await_ready=await_ready, release=release)
        getattr(self, "attach_quota", lambda fleet: None)(fleet)      # absent before the fix

    async def _save(self, m, ops=(), conds=(), created=False) -> None:
        self.migrations[m.id] = m


def migration(src, **fields) -> M.Migration:
    fields = {"id": "m-1", "workload_id": "w-1", **fields}
    return M.Migration(tenant="t", source_node=src.node, source_slice=src.id, phase=PH.MIGRATION_PHASE_PLANNED,
                       **fields)


def new_request():
    return slicespec.validate(T.SliceSpec(tenant="t", memory_bytes=8 * GiB, compute_share=0.5,
                                          isolation=T.ISOLATION_MPS, labels={pools.LABEL: "p"}))


def pool_usage(fleet, fw) -> pools.Usage:
    return pools.usage("p", fleet.slices.values(), PRICES, fleet.replaced)


LIMITS = [({"max_slices": 1}, None), ({"max_memory_bytes": 8 * GiB}, None), ({"max_gpus": 0.5}, None),
          (None, {"max_slices": 1}), (None, {"max_memory_bytes": 8 * GiB}), (None, {"max_gpus": 0.5})]


@pytest.mark.parametrize("pool_quota,tenant_quota", LIMITS)
async def test_a_move_of_a_slice_at_its_limit_is_placed_and_counts_once(pool_quota, tenant_quota):
    fleet, fw, src = cluster(pool_quota, tenant_quota)
    steps = Steps(fleet, fw)
    m = migration(src)
    steps.migrations[m.id] = m
    target = await steps._place(m, T.Workload(id="w-1", slice_id=src.id))     # refused before: both counted
    assert target.node == "n2" and m.target_slice == target.id
    # the pair counts once: at the limit, not over it; a new allocation meanwhile is still refused
    assert pool_usage(fleet, fw).slices == 1 and fleet.tenant_usage("t")[0] == 1
    assert pool_usage(fleet, fw).memory_bytes == 8 * GiB and fleet.tenant_usage("t")[1] == 8 * GiB
    d = fw.schedule(new_request(), fleet)
    assert not d.ok and ("PoolExhausted" in str(d.reasons) or "quota" in str(d.reasons))
    # the move ends (a drain evicts the source; a replica's controller releases it): back at the limit
    m.phase = PH.MIGRATION_PHASE_DONE
    fleet.drop_slice(src.id)
    assert pool_usage(fleet, fw).slices == 1 and fleet.tenant_usage("t") == (1, 8 * GiB, 0.5)


@pytest.mark.parametrize("pool_quota,tenant_quota", LIMITS[:1] + LIMITS[3:4])
async def test_a_rolled_back_move_releases_its_reservation(pool_quota, tenant_quota):
    fleet, fw, src = cluster(pool_quota, tenant_quota)
    steps = Steps(fleet, fw)
    m = migration(src)
    steps.migrations[m.id] = m
    target = await steps._place(m, T.Workload(id="w-1", slice_id=src.id))
    m.phase = PH.MIGRATION_PHASE_ABORTED
    await steps.ctl.release(target.id)
    assert pool_usage(fleet, fw).slices == 1 and fleet.tenant_usage("t") == (1, 8 * GiB, 0.5)
    assert not fw.schedule(new_request(), fleet).ok


@pytest.mark.parametrize("pool_quota,tenant_quota", LIMITS[:1] + LIMITS[3:4])
async def test_a_finished_move_whose_source_stays_counts_both(pool_quota, tenant_quota):
    """`meshctl migrate` leaves the source slice allocated (its client's): once the move is DONE the two are two
    slices again, so the tenant cannot keep a second slice past its quota by migrating."""
    fleet, fw, src = cluster(pool_quota, tenant_quota)
    steps = Steps(fleet, fw)
    m = migration(src)
    steps.migrations[m.id] = m
    await steps._place(m, T.Workload(id="w-1", slice_id=src.id))
    m.phase = PH.MIGRATION_PHASE_DONE
    assert pool_usage(fleet, fw).slices == 2 and fleet.tenant_usage("t")[0] == 2


async def test_a_tenant_cannot_pair_its_own_slices():
    """Only gpumesh sets the label: a tenant's Allocate naming it is refused (services.py SYSTEM_LABELS), and a
    label naming no unfinished move of that slice gives no credit."""
    from mesh import replacing
    assert replacing.REPLACES in slicespec.SYSTEM_LABELS
    fleet, fw, src = cluster({"max_slices": 1}, {"max_slices": 1})
    Steps(fleet, fw)
    forged = slicespec.validate(T.SliceSpec(tenant="t", memory_bytes=8 * GiB, compute_share=0.5,
                                            isolation=T.ISOLATION_MPS,
                                            labels={pools.LABEL: "p", replacing.REPLACES: src.id,
                                                    "gpumesh-migration": "m-none"}))
    assert not fw.schedule(forged, fleet).ok


@pytest.mark.parametrize("pool_quota,tenant_quota", LIMITS[:1] + LIMITS[3:4] + LIMITS[1:2] + LIMITS[4:5])
async def test_a_drain_moves_every_workload_of_a_tenant_at_its_limit(pool_quota, tenant_quota):
    """A drain starts its moves together: each reservation counts once, the second is not refused for the first."""
    fleet, fw, src = cluster({k: v * 2 for k, v in (pool_quota or {}).items()},
                             {k: v * 2 for k, v in (tenant_quota or {}).items()})
    src2 = T.Slice()
    src2.CopyFrom(src)
    src2.id, src2.allocation_id = "s-src2", "a-src2"
    fleet.put_slice(src2)
    steps = Steps(fleet, fw)
    ms = [migration(src, id="m-1"), migration(src2, id="m-2", workload_id="w-2")]
    for m in ms:
        steps.migrations[m.id] = m
    for m, s in zip(ms, (src, src2)):
        await steps._place(m, T.Workload(id=m.workload_id, slice_id=s.id))
    assert pool_usage(fleet, fw).slices == 2 and fleet.tenant_usage("t")[0] == 2
    assert not fw.schedule(new_request(), fleet).ok
    # the first move is DONE while the second runs: its source, on the draining node, waits for the eviction
    fleet.nodes["n1"].record.cordoned = fleet.nodes["n1"].record.draining = True
    ms[0].phase = PH.MIGRATION_PHASE_DONE
    assert fleet.tenant_usage("t")[0] == 2
    for s in (src, src2):               # the drain evicts them
        fleet.drop_slice(s.id)
    assert pool_usage(fleet, fw).slices == 2 and fleet.tenant_usage("t")[0] == 2


@pytest.mark.parametrize("pool_quota,tenant_quota", [({"max_memory_bytes": 8 * GiB}, None),
                                                     (None, {"max_memory_bytes": 8 * GiB}),
                                                     ({"max_gpus": 0.5}, None), (None, {"max_gpus": 0.5})])
async def test_a_resize_counts_the_larger_slice(pool_quota, tenant_quota):
    fleet, fw, src = cluster(pool_quota, tenant_quota)
    steps = Steps(fleet, fw)
    m = migration(src, resize_slice=src.id)
    steps.migrations[m.id] = m
    same = steps.target_request(src, m.id, memory_bytes=src.memory_bytes, compute_share=src.compute_share)
    assert fw.schedule(same, fleet).ok                          # an equal slice always fits
    shrink = steps.target_request(src, m.id, memory_bytes=4 * GiB, compute_share=0.25)
    assert fw.schedule(shrink, fleet).ok
    grow = steps.target_request(src, m.id, memory_bytes=16 * GiB, compute_share=1.0)
    d = fw.schedule(grow, fleet)
    assert not d.ok
    why = str(d.reasons)
    assert ('pool "p" quota' in why) if pool_quota else ("tenant t quota" in why)


async def test_a_move_still_counts_the_source_slice_of_another_tenant_or_pool():
    """The credit is the source's only: a request naming another tenant's slice gets none."""
    fleet, fw, src = cluster({"max_slices": 1}, {"max_slices": 1})
    steps = Steps(fleet, fw)
    other = T.Slice()
    other.CopyFrom(src)
    other.id, other.tenant = "s-other", "u"
    fleet.put_slice(other)
    m = migration(other)
    steps.migrations[m.id] = m
    req = steps.target_request(other, m.id)
    assert not fw.schedule(slicespec.SliceRequest(**{**req.__dict__, "tenant": "t"}), fleet).ok
