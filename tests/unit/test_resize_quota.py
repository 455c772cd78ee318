"""A resize in place grows a slice without passing the scheduler; its growth is checked against the tenant's
and the pool's quotas (controlplane/controllers/resizequota.py), and a shrink always passes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controlplane.controllers.resizequota import growth_refusal
from controlplane.scheduler import profiles
from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2
from mesh import errors, pools
from mesh.cost import PriceTable
from mesh.poolapi import pool_from_dict

GiB = 2**30
PRICES = PriceTable.parse(["H100-80GB=2.40"])


def _fleet() -> Fleet:
    fleet = Fleet()
    inv = types_pb2.NodeInventory(cpu_milli=8000, memory_bytes=64 * GiB, gpus=[
        types_pb2.Gpu(index=0, uuid="GPU-a", model="H100-80GB", memory_bytes=80 * GiB)])
    fleet.upsert_node(types_pb2.Node(name="n1", inventory=inv))
    fleet.nodes["n1"].ready = True
    return fleet


def _slice(sid: str, tenant: str = "team-a", mem: int = 10 * GiB, share: float = 0.125, pool: str = ""):
    s = types_pb2.Slice(id=sid, tenant=tenant, node="n1", gpu_index=0, gpu_model="H100-80GB",
                        isolation=types_pb2.ISOLATION_MPS, memory_bytes=mem, compute_share=share,
                        state=types_pb2.SLICE_STATE_READY, labels={pools.LABEL: pool} if pool else {})
    return s


def test_growth_past_the_tenant_memory_quota_is_refused_and_a_shrink_passes():
    fw, fleet = profiles.build(), _fleet()
    fw.plugin("TenantQuota").tenants["team-a"] = {"max_memory_bytes": 24 * GiB}
    a, b = _slice("a"), _slice("b", mem=8 * GiB)
    fleet.put_slice(a)
    fleet.put_slice(b)                                   # team-a holds 18 GiB of 24
    assert growth_refusal(fw, fleet, a, 16 * GiB, a.compute_share) is None       # +6 -> 24: at the limit
    why = growth_refusal(fw, fleet, a, 17 * GiB, a.compute_share)
    assert why is not None and "max_memory_bytes=2.57698e+10" in why and "team-a" in why
    fw.plugin("TenantQuota").tenants["team-a"] = {"max_memory_bytes": 4 * GiB}    # already over
    assert growth_refusal(fw, fleet, a, 5 * GiB, a.compute_share) is None        # a shrink brings it closer
    assert growth_refusal(fw, fleet, _slice("c", tenant="team-b"), 40 * GiB, 0.5) is None  # no quota for team-b


def test_growth_past_the_tenant_gpu_quota_is_refused():
    fw, fleet = profiles.build(), _fleet()
    fw.plugin("TenantQuota").tenants["team-a"] = {"max_gpus": 0.5}
    a = _slice("a", share=0.25)
    fleet.put_slice(a)
    assert growth_refusal(fw, fleet, a, a.memory_bytes, 0.5) is None
    assert "max_gpus=0.5" in growth_refusal(fw, fleet, a, a.memory_bytes, 0.75)


def test_growth_past_the_pool_quota_is_refused_naming_the_pool():
    fw, fleet = profiles.build(), _fleet()
    fw.plugin("Pool").set_pools({"inference-a": pools.validate(pool_from_dict(
        {"name": "inference-a", "quota": {"max_memory_bytes": 30 * GiB, "max_dollars_per_hour": 100}}))}, PRICES)
    a, b = _slice("a", pool="inference-a"), _slice("b", tenant="team-b", mem=12 * GiB, pool="inference-a")
    fleet.put_slice(a)
    fleet.put_slice(b)                                   # the pool holds 22 GiB of 30, across tenants
    assert growth_refusal(fw, fleet, a, 18 * GiB, a.compute_share) is None
    why = growth_refusal(fw, fleet, a, 19 * GiB, a.compute_share)
    assert why is not None and why.startswith('PoolExhausted: pool "inference-a" quota max_memory_bytes')
    outside = _slice("c", mem=10 * GiB)
    fleet.put_slice(outside)
    assert growth_refusal(fw, fleet, outside, 40 * GiB, 0.5) is None   # a slice of no pool


def test_growth_past_the_pool_dollar_quota_is_refused():
    fw, fleet = profiles.build(), _fleet()
    fw.plugin("Pool").set_pools({"p": pools.validate(pool_from_dict(
        {"name": "p", "quota": {"max_dollars_per_hour": 1.0}}))}, PRICES)
    a = _slice("a", pool="p", mem=8 * GiB, share=0.1)      # MPS: charged the larger of compute and memory share
    fleet.put_slice(a)
    assert growth_refusal(fw, fleet, a, 8 * GiB, 0.4) is None        # 0.4 x $2.40 = $0.96/h
    assert "max_dollars_per_hour=1" in growth_refusal(fw, fleet, a, 8 * GiB, 0.5)   # $1.20/h


@pytest.mark.asyncio
async def test_resize_in_place_refuses_growth_over_quota_and_changes_nothing():
    from controlplane.controllers.resize import ResizeMixin
    fw, fleet = profiles.build(), _fleet()
    fw.plugin("TenantQuota").tenants["team-a"] = {"max_memory_bytes": 12 * GiB}
    a = _slice("a")
    fleet.put_slice(a)

    class Manager(ResizeMixin):
        def __init__(self):
            self.ctl = SimpleNamespace(fleet=fleet, scheduler=fw)
            self.migrations, self.wm = {}, SimpleNamespace(workloads={})

        def unfinished(self):                               # MigrationManager's: none here
            return iter(self.migrations.values())

        async def _resize_in_place(self, s, mem, share):   # reached only when the quota allows
            self.grew = (mem, share)
            return s
    m = Manager()
    with pytest.raises(errors.ResourceExhausted) as e:
        await m.resize("a", 13 * GiB, 0.0)
    assert "max_memory_bytes" in str(e.value) and "unchanged" in str(e.value)
    assert fleet.slices["a"].memory_bytes == 10 * GiB and not hasattr(m, "grew")
    await m.resize("a", 12 * GiB, 0.0)
    assert m.grew == (12 * GiB, 0.125)
