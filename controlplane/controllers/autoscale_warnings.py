"""The autoscaler's Warning events that tell an episode once (controlplane/controllers/autoscaler.py): a cost ceiling
that holds a deployment below what its load wants (`CostCeiling`, with the figures), a resource pool with no room
for more (`PoolLimit`, on the deployment and on the pool: controlplane/pools/store.py `held`), a replica's load
reading gone stale (`LoadStale`, autoscale_freshness.py). Each is sent when its episode starts, and again only
once it ended and starts again (the flags on the deployment's `_State`)."""

from __future__ import annotations

from controlplane.controllers import autoscale_freshness
from mesh.autoscale import Decision, ScalingPolicy

SOURCE = "autoscaler"


def bounds(dm, name: str, d, st, decision: Decision, cost: float, signals: dict) -> None:
    """`CostCeiling` and `PoolLimit` when `decision` is bound by the cost ceiling or the pool and was not before."""
    tenant = d.spec.tenant
    bound = decision.bound_by == "cost_ceiling"
    if bound and not st.ceiling_bound:
        dm._event_as(name, "Warning", "CostCeiling", ceiling_message(st.policy, decision, cost, signals), tenant,
                     SOURCE)
    st.ceiling_bound = bound
    pool_bound = decision.bound_by == "pool"
    if pool_bound and not st.pool_bound:
        text = f"pool {d.spec.pool!r} holds the deployment at {decision.desired}: {decision.reason}"
        dm._event_as(name, "Warning", "PoolLimit", text[:1000], tenant, SOURCE)
        held = getattr(getattr(dm.ctl, "pools", None), "held", None)
        if held is not None:            # and on the pool (`meshctl describe pool`)
            held(d.spec.pool, "PoolLimit", name, tenant, f"held at {decision.desired} replica(s) by the pool's "
                 f"room: {decision.reason}", SOURCE)
    st.pool_bound = pool_bound


def stale(dm, name: str, d, st, gap: autoscale_freshness.Gaps, max_age: float) -> None:
    """`LoadStale` when a replica's reading went stale and none was before."""
    if gap.stale and not st.load_stale:
        dm._event_as(name, "Warning", "LoadStale", autoscale_freshness.stale_message(gap, max_age), d.spec.tenant,
                     SOURCE)
    st.load_stale = bool(gap.stale)


def ceiling_message(policy: ScalingPolicy, decision: Decision, cost: float, signals: dict) -> str:
    wanted = max(signals.get("want_stable", 0), signals.get("want_panic", 0), signals.get("want_forecast", 0))
    return (f"the cost ceiling ${policy.cost_ceiling_per_hour:g}/h holds the deployment at {decision.desired} "
            f"replica(s) at ${cost:.4f}/h each (${decision.desired * cost:.4f}/h); the load wants {wanted:g} "
            f"(${wanted * cost:.4f}/h). {decision.reason}")[:1000]
