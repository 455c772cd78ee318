"""TenantQuota's pre-filter never refuses what its permit step (the exact figures of the slices chosen)
would allow: it counts the least a request's slices can take (a MIG profile's share of its GPU, not a whole
GPU), and for a request that may preempt, the tenant's usage less what evicting its own slices gives back."""

from __future__ import annotations

import pytest

from controlplane import placement
from controlplane.scheduler import profiles
from controlplane.scheduler.framework import Code, CycleState
from controlplane.scheduler.plugins import quota
from gpumesh.v1 import types_pb2 as t
from mesh import errors
from tests.unit.test_placement import make_fleet
from tests.unit.test_scheduler_plugins import req

GiB = 1 << 30


def holding(fleet, gpus: float, tenant: str = "t", node: str = "a", prio: int = 0) -> None:
    """`tenant` holds `gpus` GPUs' worth of MPS slices on `node`'s first GPUs (half a GPU each)."""
    for i in range(int(gpus * 2)):
        fleet.put_slice(t.Slice(id=f"held-{tenant}-{i}", allocation_id=f"held-{tenant}-{i}", tenant=tenant,
                                node=node, gpu_index=i // 2, memory_bytes=GiB, compute_share=0.5, priority=prio,
                                state=t.SLICE_STATE_READY, isolation=t.ISOLATION_MPS))


def scheduler(**limits):
    return profiles.from_config({"args": {"TenantQuota": {"tenants": {"t": limits}}}})


def test_a_mig_slice_that_fits_the_gpu_quota_is_placed():
    # 1.5 GPUs held of 2: a 1g.10gb slice takes a seventh of an H100, not a whole GPU
    fleet = make_fleet(("a", [("H100-80GB", False)] * 2), ("b", [("H100-80GB", True)]))
    holding(fleet, 1.5)
    st = quota.Plugin(tenants={"t": {"max_gpus": 2}}).pre_filter(CycleState(), req(mig_profile="1g.10gb"), fleet)
    assert st.code == Code.SUCCESS, st.reasons
    (c,) = placement.place(fleet, req(mig_profile="1g.10gb"), scheduler(max_gpus=2))
    assert (c.node, c.profile, c.compute_share) == ("b", "1g.10gb", 0.1429)


def test_a_mig_slice_over_the_gpu_quota_is_refused_naming_it():
    fleet = make_fleet(("a", [("H100-80GB", False)] * 2), ("b", [("H100-80GB", True)]))
    holding(fleet, 2)
    with pytest.raises(errors.ResourceExhausted, match=r"quota max_gpus=2 exceeded: uses 2, asks 0\.1429") as exc:
        placement.place(fleet, req(mig_profile="1g.10gb"), scheduler(max_gpus=2))
    assert "quota" in exc.value.reasons


def test_a_mig_profile_is_counted_at_its_memory_not_the_memory_named():
    # memory_bytes beside a profile does not size the slice: the profile's 10 GiB are what it holds
    fleet = make_fleet(("b", [("H100-80GB", True)]))
    (c,) = placement.place(fleet, req(mig_profile="1g.10gb", memory_bytes=40 * GiB),
                           scheduler(max_memory_bytes=c_mem(fleet)))
    assert c.profile == "1g.10gb"


def c_mem(fleet) -> int:
    """The memory a 1g.10gb slice holds on an H100-80GB (what the permit step counts)."""
    (c,) = placement.place(fleet, req(mig_profile="1g.10gb"), profiles.build("default"))
    return c.memory_bytes


SPECS = [
    {"mig_profile": "1g.10gb"},
    {"mig_profile": "3g.40gb", "count": 2},
    {"mig_profile": "1g.10gb", "compute_share": 0.1},
    {"memory_bytes": 5 * GiB},
    {"memory_bytes": 5 * GiB, "compute_share": 0.25},
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_MPS},
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_MPS, "compute_share": 0.3, "count": 3},
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_TIMESHARE},
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_EXCLUSIVE, "count": 2},
    {"memory_bytes": 30 * GiB, "isolation": t.ISOLATION_MIG},
]


def placeable(specs: list[dict]) -> list:
    """(spec, mig) for each spec and GPU mode some GPU of the fleet holds it in (a MIG request only on GPUs in MIG
    mode; an explicit non-MIG isolation only on GPUs not in it; a bare memory request on either)."""
    out = []
    for spec in specs:
        wants_mig = bool(spec.get("mig_profile")) or spec.get("isolation") == t.ISOLATION_MIG
        for mig in (True, False):
            if wants_mig == mig or (not wants_mig and spec.get("isolation") is None):
                out.append(pytest.param(spec, mig, id=f"{spec}-{'mig-gpus' if mig else 'whole-gpus'}"))
    return out


@pytest.mark.parametrize("spec, mig", placeable(SPECS))
def test_the_pre_filter_allows_what_the_permit_step_allows(spec, mig):
    """A quota set exactly to what the placement will take (on top of 1.5 GPUs held) lets it through."""
    fleet = make_fleet(("a", [("L4", False)] * 2), ("b", [("H100-80GB", mig), ("A100-40GB", mig)] * 2))
    holding(fleet, 1.5)
    choices = placement.place(fleet, req(**spec), profiles.build("default"))
    gpus = 1.5 + sum(c.compute_share for c in choices)
    memory = 3 * GiB + sum(c.memory_bytes for c in choices)
    got = placement.place(fleet, req(**spec), scheduler(max_gpus=gpus, max_memory_bytes=memory,
                                                         max_slices=3 + len(choices)))
    assert [(c.node, c.gpu_index, c.compute_share, c.memory_bytes) for c in got] == \
           [(c.node, c.gpu_index, c.compute_share, c.memory_bytes) for c in choices]


def test_a_request_that_may_preempt_its_own_slices_passes_the_pre_filter():
    # the tenant is at max_slices; its priority-10 request may evict its own priority-0 slice (permit
    # counts the usage less the victims)
    fleet = make_fleet(("a", [("L4", False)]))
    fleet.put_slice(t.Slice(id="own", allocation_id="own", tenant="t", node="a", gpu_index=0, priority=0,
                            state=t.SLICE_STATE_READY, memory_bytes=GiB, compute_share=1.0,
                            isolation=t.ISOLATION_EXCLUSIVE))
    fw = scheduler(max_slices=1)
    d = fw.schedule(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, priority=10, preempt=True), fleet)
    assert d.ok, d.reasons
    assert list(d.victims) == ["own"]
    # without the right to preempt (or at the same priority) the quota refuses it
    for spec in ({"priority": 10}, {"priority": 0, "preempt": True}):
        d = fw.schedule(req(memory_bytes=GiB, isolation=t.ISOLATION_EXCLUSIVE, **spec), fleet)
        assert not d.ok and "quota max_slices=1 exceeded" in str(d.reasons)


POOL_SPECS = [
    {"memory_bytes": 5 * GiB},                                                  # a MIG-capable model not in MIG mode
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_TIMESHARE, "compute_share": 0.5},   # charged its memory
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_MPS},
    {"memory_bytes": 5 * GiB, "isolation": t.ISOLATION_MIG},
    {"mig_profile": "1g.10gb"},
]


@pytest.mark.parametrize("spec, mig", placeable(POOL_SPECS))
def test_the_pool_pre_filter_allows_what_its_permit_step_allows(spec, mig):
    """The same for a pool's quota (GPU-equivalents, dollars an hour): set exactly to what the placement takes."""
    from mesh import pools
    from mesh.cost import PriceTable, slice_share
    from mesh.slicespec import ISOLATION_ENUM
    from tests.unit.test_pools import pool
    fleet = make_fleet(("b", [("H100-80GB", mig)]))
    prices = PriceTable.parse(["H100-80GB=1.00"])
    labelled = dict(spec, labels={pools.LABEL: "p"})
    free = profiles.build()
    free.plugin("Pool").set_pools({"p": pools.validate(pool(name="p"))}, prices)
    (c,) = placement.place(fleet, req(**labelled), free)
    share = slice_share(ISOLATION_ENUM[c.isolation], c.gpu_model, profile=c.profile or "",
                        memory_bytes=c.memory_bytes, compute_share=c.compute_share)
    fw = profiles.build()
    fw.plugin("Pool").set_pools({"p": pools.validate(pool(name="p", quota={
        "max_gpus": share, "max_dollars_per_hour": share * prices.gpu_hour(c.gpu_model) + 1e-9}))}, prices)
    (got,) = placement.place(fleet, req(**labelled), fw)
    assert (got.node, got.gpu_index, got.profile) == (c.node, c.gpu_index, c.profile)
