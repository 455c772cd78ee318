"""What sizes a predictive policy's forecast floor, per deployment (the autoscaler controller's `_State` as `st`):
the replica's figures (time in service, TTFT of a free slot), measured, kept, the previous leader's on the status,
or the registry's; and their expiry when the deployment's model identity changes (autoscale_signals.model_identity).
"""

from __future__ import annotations

import dataclasses
import logging

from controlplane.controllers import autoscale_signals
from gpumesh.v1 import deployment_service_pb2 as D
from mesh.autoscale.planner import ServiceFigures, measured_figures
from mesh.logs import log

logger = logging.getLogger("controlplane.controllers.autoscaler")
SOURCE = "autoscaler"


def figures(d: D.Deployment, st, variant, replicas: list, now: float, cold: float) -> ServiceFigures | None:
    """The replica's figures that size the forecast floor: measured over the stable window; after a
    window with no request, the last measured (kept in memory), else what the previous leader wrote
    on the status (`service_s`, `ttft_free_s`), else the registry's `model bench` figures; the slots
    and the cold start are always today's."""
    slots = autoscale_signals.slots(d.spec, variant)
    ttft = autoscale_signals.free_slot_ttft(variant, replicas)
    samples = [x for x in st.plan.recent(now, st.policy.stable_window_s) if x.t >= st.measured_since]
    f = measured_figures(samples, slots=slots, cold_start_s=cold, ttft_s=ttft)
    if f is not None:
        st.figures, st.figures_from = f, "measured"
        return f
    if st.figures is None:
        signals = d.status.autoscaler.signals if status_figures_apply(d, st) else {}
        service = signals.get("service_s", 0.0)
        if service > 0:
            st.figures = ServiceFigures(service_s=service, ttft_s=signals.get("ttft_free_s", 0.0),
                                        slots=slots, cold_start_s=cold)
            st.figures_from = "status"
        else:
            st.figures = autoscale_signals.registry_figures(variant, replicas, slots=slots, cold_start_s=cold)
            st.figures_from = "registry" if st.figures is not None else ""
    if st.figures is None:
        return None
    return dataclasses.replace(st.figures, slots=slots, cold_start_s=cold,
                               ttft_s=ttft if ttft is not None else st.figures.ttft_s)


def status_figures_apply(d: D.Deployment, st) -> bool:
    """Whether the figures on the status describe the model deployed now: not once this leader saw the model
    change, nor when the status names another model identity (a change the previous leader decided on and
    had not written figures for, before it lost the lead)."""
    if not d.status.HasField("autoscaler") or not st.status_figures:
        return False
    written = d.status.autoscaler.figures_model
    return not written or st.identity is None or written == autoscale_signals.identity_digest(st.identity)


def note_model_identity(dm, name: str, d: D.Deployment, st, variant, need: int, comp, now: float) -> None:
    """Expire the model-dependent figures when the model identity changes (autoscale_signals.model_identity):
    the kept measured figures and the status's (an earlier model's time in service and TTFT) are dropped, and
    only samples from now on measure new ones; until then the registry's figures of the new variant size the
    floor. The load samples of the windows, the request-rate buckets and forecast (demand) and the counters
    stay: they are readings of the replicas serving now (the old ones serve until the rollout replaces
    them), not a model's figures reused later, and they age out with the stable window."""
    ident = autoscale_signals.model_identity(d.spec, variant, need, comp.spec if comp is not None else None)
    if ident is None or ident == st.identity:
        return
    old, st.identity = st.identity, ident
    if old is None:
        return                  # first seen (a new leader): the status's figures are this model's
    dropped = st.figures if st.policy.predictive else None    # (only a predictive policy sizes with them)
    st.figures, st.figures_from, st.measured_since, st.status_figures = None, "", now, False
    change = autoscale_signals.identity_change(old, ident)
    was = f"service {dropped.service_s:.3g} s, TTFT {dropped.ttft_s:.3g} s" if dropped is not None else "none kept"
    if not st.policy.predictive:
        return
    dm._event_as(name, "Normal", "FiguresReset", f"model identity changed ({change}): the figures measured "
                      f"before ({was}) no longer size replicas; the new ones are measured from now (the "
                      f"registry's until then)"[:1000], d.spec.tenant, SOURCE)
    log(logger, logging.INFO, "autoscaler figures reset: model identity changed", deployment=name, change=change,
        service_s=dropped.service_s if dropped is not None else None)
