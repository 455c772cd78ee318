"""TenantQuota: a tenant may hold at most so many slices, GPU memory bytes and GPUs (the sum of
its slices' compute shares), and ask for at most priority `max_priority` (a priority above other tenants'
lets its requests preempt their slices); a request over a limit is refused naming the quota.

The pre-filter refuses early from what the request names; `permit` checks the placement the cycle chose,
with the memory and compute shares its slices will really hold (a MIG profile's, a time-share slice's whole
GPU: the request does not name them), less what preempting the tenant's own victims gives back."""

from __future__ import annotations

from controlplane.state.fleet import Fleet
from controlplane.scheduler.framework import SUCCESS, Code, CycleState, Status
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
        slices, memory, gpus = fleet.usage.get(req.tenant, (0, 0, 0.0))
        share = 1.0 if req.isolation == "exclusive" else (req.compute_share or (1.0 if req.memory_bytes == 0 else 0.0))
        want = {"max_slices": (slices, req.count), "max_memory_bytes": (memory, req.memory_bytes * req.count),
                "max_gpus": (gpus, share * req.count)}
        cap = q.get("max_priority")
        if cap is not None and req.priority > cap:
            why = f"tenant {req.tenant} quota max_priority={cap:g} exceeded: asks priority {req.priority}"
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("quota", why),), NAME)
        return _check_limits(req.tenant, q, want)

    def permit(self, state: CycleState, req: SliceRequest, fleet: Fleet, choices: list, victims=()) -> Status:
        """The chosen placement (`choices`, after evicting the allocations `victims`) within the quota."""
        q = self.tenants.get(req.tenant, self.default)
        if not q:
            return SUCCESS
        slices, memory, gpus = fleet.usage.get(req.tenant, (0, 0, 0.0))
        for a in victims:
            for s in fleet.slices_of(a):
                if s.tenant == req.tenant:
                    slices, memory, gpus = slices - 1, memory - s.memory_bytes, gpus - s.compute_share
        want = {"max_slices": (slices, len(choices)),
                "max_memory_bytes": (memory, sum(c.memory_bytes for c in choices)),
                "max_gpus": (gpus, sum(c.compute_share for c in choices))}
        return _check_limits(req.tenant, q, want)


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
