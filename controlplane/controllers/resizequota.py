"""The quotas a resize in place must respect: a slice that grows where it stands takes more of its tenant's
quota (TenantQuota: GPU memory, GPUs) and of its pool's (Pool: GPUs, memory, dollars per hour) without
passing the scheduler, so the growth is checked here against the same plugins' limits. Only the growth
counts: a shrink is always allowed, even for a tenant already over its quota (it brings it closer).

A resize by migration needs no check here: its new slice is allocated through the scheduler as a reservation for
the old one (controllers/migration_quota.py), whose plugins count the pair once, at the larger of the two, until
the resize ends: only the growth must fit. (They used to count both, so a slice of a full pool or of a tenant at
its quota could not be resized by migration at all, not even to a smaller size.)"""

from __future__ import annotations

from gpumesh.v1 import types_pb2
from mesh import pools as P
from mesh.cost import PriceTable


def _plugin(framework, name: str):
    try:
        return framework.plugin(name)
    except KeyError:          # the profile does not have it: that quota is not enforced anywhere
        return None


def _tenant_refusal(plugin, fleet, s: types_pb2.Slice, grow_mem: int, grow_gpus: float) -> str | None:
    q = plugin.tenants.get(s.tenant, plugin.default)
    if not q:
        return None
    _, memory, gpus = fleet.tenant_usage(s.tenant)
    for key, used, more in (("max_memory_bytes", memory, grow_mem), ("max_gpus", gpus, grow_gpus)):
        limit = q.get(key)
        if limit is not None and more > 0 and used + more > limit + 1e-9:
            return f"tenant {s.tenant} quota {key}={limit:g} exceeded: uses {used:g}, the resize asks {more:g} more"
    return None


def _pool_refusal(plugin, fleet, s: types_pb2.Slice, new: types_pb2.Slice) -> str | None:
    name = s.labels.get(P.LABEL)
    pool = plugin.pools.get(name) if name else None
    if pool is None:
        return None
    prices: PriceTable = plugin.prices
    grow_gpus = max(0.0, P.slice_gpus(new) - P.slice_gpus(s))
    grow_mem = max(0, new.memory_bytes - s.memory_bytes)
    used = P.usage(name, fleet.slices.values(), prices, fleet.replaced)
    return P.refusal(pool, used, 0, grow_mem, grow_gpus, grow_gpus * prices.gpu_hour(s.gpu_model))


def growth_refusal(framework, fleet, s: types_pb2.Slice, memory_bytes: int, compute_share: float) -> str | None:
    """Why growing slice `s` in place to (`memory_bytes`, `compute_share`) would break its tenant's or its
    pool's quota; None when it may."""
    new = types_pb2.Slice()
    new.CopyFrom(s)
    new.memory_bytes, new.compute_share = memory_bytes, compute_share
    tenant = _plugin(framework, "TenantQuota")
    if tenant is not None:
        why = _tenant_refusal(tenant, fleet, s, max(0, memory_bytes - s.memory_bytes),
                              max(0.0, compute_share - s.compute_share))
        if why is not None:
            return why
    pool = _plugin(framework, "Pool")
    if pool is not None:
        return _pool_refusal(pool, fleet, s, new)
    return None
