"""Variant overflow, the autoscaler controller's side (controlplane/controllers/autoscaler.py, `ctl`): a policy with
`variants` shares its decision between the deployment and a companion deployment of the next variant that fits when
replicas wait for lack of room (the arithmetic: autoscale_variants.py), creates or scales the companion with a
`VariantOverflow` event, and deletes companions whose deployment is gone or lists no variants any more."""

from __future__ import annotations

import logging

from controlplane.controllers import autoscale_signals, autoscale_variants
from gpumesh.v1 import deployment_service_pb2 as D
from mesh import errors
from mesh.autoscale import Decision
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.autoscaler")
SOURCE = "autoscaler"


def companion(ctl, d: D.Deployment, variant: str, replicas: int = 0) -> D.DeploymentSpec:
    try:
        model = ctl.registry.get(d.spec.model)
    except errors.MeshError:
        model = None
    v = next((x for x in model.variants if x.name == variant), None) if model is not None else None
    return autoscale_variants.companion_spec(d.spec, variant, replicas, v, autoscale_variants.created_stamp(d))


def _need(ctl, d: D.Deployment, variant: str) -> int:
    """The VRAM need of a replica of `d`'s companion as `variant` (0: the registry does not resolve it)."""
    try:
        return ctl.dm._resolve(companion(ctl, d, variant))[1]
    except errors.MeshError:
        return 0


def _fit(ctl, d: D.Deployment, need: int, cost: float) -> int:
    """Replicas of `need` the fleet's free capacity (and the deployment's pool) hold now, estimated."""
    n = autoscale_variants.fit_count(need, getattr(ctl.dm.ctl, "fleet", None), int(d.spec.isolation))
    pools = getattr(ctl.dm.ctl, "pools", None)
    if d.spec.pool and pools is not None:
        room = pools.room(d.spec.pool, need, cost)
        if room is not None:
            n = min(n, room)
    return n


async def share(ctl, name: str, d: D.Deployment, st, decision: Decision, replicas: list,
                comp: D.Deployment | None, comp_replicas: list, need: int, cost: float, signals: dict) -> int:
    """Share the decision between the deployment and its companion of the next variant that fits
    (controlplane/controllers/autoscale_variants.py); creates or scales the companion; returns the
    deployment's own replicas."""
    waiting = autoscale_variants.no_room(replicas)
    if not waiting and comp is None:
        return decision.desired
    gpu_models, prices = ctl.registry.gpu_models(), getattr(ctl.dm, "prices", None)
    iso = int(d.spec.isolation)

    def fits(v: str) -> bool:
        n = _need(ctl, d, v)
        return n > 0 and _fit(ctl, d, n, autoscale_signals.replica_cost([], {}, n, iso, gpu_models, prices)) > 0
    variant = comp.spec.variant if comp is not None else \
        autoscale_variants.next_variant(st.policy.variants, d.spec.variant, fits)
    if variant is None:
        signals["overflow_replicas"] = 0
        return decision.desired
    need_c = _need(ctl, d, variant)
    cost_c = autoscale_signals.replica_cost(comp_replicas, ctl.dm.ctl.fleet.slices, need_c, iso, gpu_models, prices)
    own_need = need or d.status.vram_bytes
    now = ctl.clock()
    if waiting and comp is not None and comp.spec.replicas > 0:
        st.swap_hold_until = now + autoscale_variants.RETRY_S     # the fit estimate missed: back off
    parent_fits = now >= st.swap_hold_until and _fit(ctl, d, own_need, cost) > 0
    sp = autoscale_variants.split(
        decision.desired, max_replicas=st.policy.max_replicas, ceiling=st.policy.cost_ceiling_per_hour,
        parent_ready=sum(1 for r in replicas if r.state == D.REPLICA_STATE_READY),
        parent_placed=autoscale_variants.placed(replicas), waiting=waiting,
        companion_now=comp.spec.replicas if comp is not None else 0,
        parent_fits=parent_fits, companion_fit=_fit(ctl, d, need_c, cost_c) if need_c else 0,
        parent_cost=cost, companion_cost=cost_c)
    signals.update(overflow_replicas=sp.companion, overflow_replica_cost_per_hour=round(cost_c, 4))
    now_c = comp.spec.replicas if comp is not None else 0
    if sp.companion == now_c:
        return sp.parent
    cname = comp.spec.name if comp is not None else autoscale_variants.companion_name(name, variant)
    try:
        if comp is None:
            await ctl.dm.create(companion(ctl, d, variant, sp.companion))
        else:
            await ctl.dm.scale(cname, sp.companion)
    except errors.MeshError as e:
        ctl.dm._event_as(name, "Warning", "VariantOverflow",
                         f"could not set {cname} (variant {variant}) to {sp.companion}: {e}"[:1000],
                         d.spec.tenant, SOURCE)
        return decision.desired
    text = (f"variant {variant} ({cname}) {now_c} -> {sp.companion} replica(s), {d.spec.variant or 'own'} "
            f"{sp.parent}: {sp.reason}{', bound by ' + sp.bound_by if sp.bound_by else ''}; "
            f"${cost:.4f}/h and ${cost_c:.4f}/h each")
    ctl.dm._event_as(name, "Normal", "VariantOverflow", text[:1000], d.spec.tenant, SOURCE)
    log(logger, logging.INFO, "variant overflow", deployment=name, companion=cname, variant=variant,
        replicas_from=now_c, replicas_to=sp.companion, own=sp.parent, reason=sp.reason)
    return sp.parent


async def companions_gone(ctl) -> None:
    """Delete companions whose deployment is gone (deleted, or deleted and created again under its name: the
    new one is not their parent, autoscale_variants.belongs) or no longer lists variants in its policy."""
    for cname, c in sorted(ctl.dm.store.deployments.items()):
        parent = c.spec.labels.get(autoscale_variants.LABEL_OVERFLOW_OF)
        if not parent:
            continue
        p = ctl.dm.store.deployments.get(parent)
        if p is not None and autoscale_variants.belongs(c, p) and p.spec.HasField("scaling") \
                and p.spec.scaling.variants:
            continue
        try:
            await ctl.dm.delete(cname)
        except errors.NotFound:
            continue
        log(logger, logging.INFO, "variant companion deleted", deployment=parent, companion=cname)
