"""TenantQuota: a tenant may hold at most so many slices, GPU memory bytes and GPUs (the sum of
its slices' compute shares), and ask for at most priority `max_priority` (a priority above other tenants'
lets its requests preempt their slices); a request over a limit is refused naming the quota.

`permit` checks the placement the cycle chose, with the memory and compute shares its slices will really
hold (a MIG profile's, a time-share slice's whole GPU: the request does not name them), less what preempting
the tenant's own victims gives back; it is the authority. The pre-filter refuses early only what no placement
could bring within the quota: it counts the least a slice of the request can take on any GPU model it may land
on (`least_take`), and for a request that may preempt, the tenant's usage less all its slices it could evict.
(It used to count a MIG profile as a whole GPU, refusing a tenant near `max_gpus` a slice that fitted.)

The usage is `Fleet.tenant_usage`: a live move's target and source (a migration's, a drain's, a resize's) count
once, at the larger of the two, and the target's request asks only its growth beyond the source, so a tenant at
its quota can still have its slices moved (a resize that grows must still fit)."""

from __future__ import annotations

import functools

from controlplane.state.fleet import MIB, Fleet
from controlplane.scheduler.framework import SUCCESS, Code, CycleState, Status
from gpumesh.v1 import types_pb2
from mesh import gpumodels, replacing
from mesh.slicespec import SliceRequest

NAME = "TenantQuota"
LIMITS = ("max_slices", "max_memory_bytes", "max_gpus", "max_priority")


class Plugin:
    NAME = NAME

    def __init__(self, tenants: dict | None = None, default: dict | None = None) -> None:
        self.tenants = {t: self._check(t, q) for t, q in (tenants or {}).items()}
        self.default = self._check("default", default or {})

    @staticmethod
    def _check(who: str, q: dict) -> dict:
        if not isinstance(q, dict):
            raise ValueError(f"{NAME}: quota of {who} must be a mapping of {', '.join(LIMITS)}")
        for k, v in q.items():
            if k not in LIMITS:
                raise ValueError(f"{NAME}: unknown quota {k!r} for {who}; allowed: {', '.join(LIMITS)}")
            if not isinstance(v, (int, float)) or not v >= 0:   # NaN: never exceeded
                raise ValueError(f"{NAME}: {who}.{k} must be a number >= 0, not {v!r}")
        return dict(q)

    def pre_filter(self, state: CycleState, req: SliceRequest, fleet: Fleet) -> Status:
        q = self.tenants.get(req.tenant, self.default)
        if not q:
            return SUCCESS
        cap = q.get("max_priority")
        if cap is not None and req.priority > cap:
            why = f"tenant {req.tenant} quota max_priority={cap:g} exceeded: asks priority {req.priority}"
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("quota", why),), NAME)
        share, memory_each = least_take(req.memory_bytes, req.compute_share, req.isolation, req.mig_profile,
                                        _models(req))
        more = _beyond_source(fleet, req, (req.count, memory_each * req.count, share * req.count))
        used = fleet.tenant_usage(req.tenant)
        st = _check_limits(req.tenant, q, _want(used, more))
        if not st.ok and req.preempt:
            # permit counts the usage less the tenant's own victims: judge it on the least it could come to
            st = _check_limits(req.tenant, q, _want(_usage_after_preemption(fleet, req, used), more))
        return st

    def permit(self, state: CycleState, req: SliceRequest, fleet: Fleet, choices: list, victims=()) -> Status:
        """The chosen placement (`choices`, after evicting the allocations `victims`) within the quota."""
        q = self.tenants.get(req.tenant, self.default)
        if not q:
            return SUCCESS
        used = fleet.tenant_usage(req.tenant, frozenset(victims))
        more = _beyond_source(fleet, req, (len(choices), sum(c.memory_bytes for c in choices),
                                           sum(c.compute_share for c in choices)), frozenset(victims))
        return _check_limits(req.tenant, q, _want(used, more))


def _beyond_source(fleet: Fleet, req: SliceRequest, more: tuple, gone: frozenset = frozenset()) -> tuple:
    """What `req` asks of its tenant's quota: all of `more`, or for a move's target (its request labelled as
    replacing one of the tenant's slices while the move is live, mesh/replacing.py) only what it takes beyond the
    source: the pair counts once, at the larger of the two."""
    src = fleet.replaced(req)
    if src is None or src.allocation_id in gone:
        return more
    return replacing.beyond(more, (1, src.memory_bytes, src.compute_share))


def _want(used, more) -> dict:
    return {k: (u, m) for k, u, m in zip(("max_slices", "max_memory_bytes", "max_gpus"), used, more)}


def _models(req: SliceRequest) -> tuple[str, ...]:
    """The GPU models `req` may land on (all known ones when it names none)."""
    if req.gpu_model:
        return (req.gpu_model,)
    return tuple(req.gpu_models) or tuple(gpumodels.MODELS)


@functools.lru_cache(maxsize=4096)
def least_take(memory_bytes: int, compute_share: float, isolation: str | None, mig_profile: str | None,
               models: tuple[str, ...]) -> tuple[float, int]:
    """The least compute share and the least GPU memory one slice of such a request can be charged on any of
    `models`, in MIG mode or not, by the figures NodeResourcesFit (`fit_one`) gives the slice it picks and
    permit counts. Each is a lower bound on its own (the two may come from different GPUs). A MIG slice's
    figures are its profile's; where a figure depends on the memory the GPU reports (an MPS slice's default
    share, an exclusive slice's memory) the bound does not assume the catalog's, which a card may exceed."""
    shares, memories = [], []
    for name in models:
        m = gpumodels.MODELS.get(name)
        if m is None:
            continue
        if m.mig_capable and isolation in (None, "mig"):
            if mig_profile:
                p = next((p for p in m.mig_profiles if p.name == mig_profile), None)
            else:
                p = m.smallest_profile_for(memory_bytes, compute_share)
            if p is not None:
                shares.append(round(p.compute_slices / gpumodels.MIG_COMPUTE_SLICES, 4))
                memories.append(p.memory_mib * MIB)
        if isolation != "mig":
            if isolation == "exclusive":
                shares.append(1.0)
            elif compute_share or isolation in (None, "timeshare"):
                shares.append(round(compute_share or 1.0, 4))
            else:
                shares.append(0.0)        # MPS: the memory asked over the GPU's (as the GPU reports it)
            memories.append(memory_bytes)  # exclusive: the whole GPU, at least the memory asked
    # no model can hold it: the filters refuse it, with a better reason than a quota
    return min(shares, default=0.0), min(memories, default=0)


def _usage_after_preemption(fleet: Fleet, req: SliceRequest, used) -> tuple:
    """The tenant's usage less every slice of its own that `req` could preempt (those of lower priority
    that are not already being released): the least it can hold once permit subtracts the victims."""
    slices, memory, gpus = used
    for s in fleet.slices.values():
        if (s.tenant == req.tenant and s.allocation_id and s.priority < req.priority
                and s.state != types_pb2.SLICE_STATE_RELEASING):
            slices, memory, gpus = slices - 1, memory - s.memory_bytes, gpus - s.compute_share
    return slices, memory, gpus


def _check_limits(tenant: str, q: dict, want: dict) -> Status:
    for k, limit in q.items():
        if k not in want:               # max_priority: checked on the request itself
            continue
        used, more = want[k]
        if used + more > limit + 1e-9:
            why = (f"tenant {tenant} quota {k}={limit:g} exceeded: uses {used:g}, "
                   f"asks {more:g} more")
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("quota", why),), NAME)
    return SUCCESS


def priority_cap(framework, tenant: str) -> float | None:
    """The highest priority `tenant` may ask for under the profile's TenantQuota (None: no cap)."""
    try:
        plugin = framework.plugin(NAME) if framework is not None else None
    except KeyError:
        return None
    if plugin is None:
        return None
    return plugin.tenants.get(tenant, plugin.default).get("max_priority")
