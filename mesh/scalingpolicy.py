"""Scaling policies on the client side: build a `gpumesh.v1.ScalingPolicy` from plain values (the SDK and
`meshctl autoscale`), and the documents `meshctl get policies -o json|yaml`, `describe deployment` and the
gateway's `/policies` print."""

from __future__ import annotations

from typing import Any

from gpumesh.v1 import scaling_pb2 as S
from mesh.autoscale import ScalingPolicy

DEFAULTS = ScalingPolicy()


def build(*, min_replicas: int | None = None, max_replicas: int, metric: str = "concurrency", target: float,
          stable_window_s: float = 0.0, panic_window_s: float = 0.0, panic_threshold: float = 0.0,
          scale_up_delay_s: float = 0.0, scale_down_delay_s: float | None = None, max_scale_up_rate: float = 0.0,
          scale_to_zero_after_s: float = 0.0, predictive: bool = False, lead_time_s: float = 0.0,
          forecast_quantile: float = 0.0, cost_ceiling_per_hour: float = 0.0,
          variants: tuple[str, ...] = (), slo_ttft_ms: float = 0.0, sizing: str = "",
          sizing_quantile: float = 0.0, nowcast: bool | None = None, catch_up: bool | None = None) -> S.ScalingPolicy:
    """A policy message; 0 / None leave a field at the control plane's default (see scaling.proto).
    With `scale_to_zero_after_s` and no `min_replicas`, min_replicas is 0."""
    p = S.ScalingPolicy(max_replicas=max_replicas, metric=metric, target=target,
                        stable_window_seconds=stable_window_s, panic_window_seconds=panic_window_s,
                        panic_threshold=panic_threshold, scale_up_delay_seconds=scale_up_delay_s,
                        max_scale_up_rate=max_scale_up_rate, scale_to_zero_after_seconds=scale_to_zero_after_s,
                        predictive=predictive, lead_time_seconds=lead_time_s, forecast_quantile=forecast_quantile,
                        cost_ceiling_per_hour=cost_ceiling_per_hour, variants=list(variants),
                        slo_ttft_ms=slo_ttft_ms, sizing=sizing, sizing_quantile=sizing_quantile)
    if nowcast is not None:
        p.nowcast = nowcast
    if catch_up is not None:
        p.catch_up = catch_up
    if min_replicas is None and scale_to_zero_after_s:
        min_replicas = 0
    if min_replicas is not None:
        p.min_replicas = min_replicas
    if scale_down_delay_s is not None:
        p.scale_down_delay_seconds = scale_down_delay_s
    return p


def effective(p: S.ScalingPolicy) -> dict[str, Any]:
    """The policy with every default filled in, as a document."""
    d = DEFAULTS
    return {
        "min_replicas": p.min_replicas if p.HasField("min_replicas") else d.min_replicas,
        "max_replicas": p.max_replicas, "metric": p.metric or d.metric, "target": p.target,
        "stable_window_seconds": p.stable_window_seconds or d.stable_window_s,
        "panic_window_seconds": p.panic_window_seconds or d.panic_window_s,
        "panic_threshold": p.panic_threshold or d.panic_threshold,
        "scale_up_delay_seconds": p.scale_up_delay_seconds,
        "scale_down_delay_seconds": (p.scale_down_delay_seconds if p.HasField("scale_down_delay_seconds")
                                     else d.scale_down_delay_s),
        "max_scale_up_rate": p.max_scale_up_rate or d.max_scale_up_rate,
        "scale_to_zero_after_seconds": p.scale_to_zero_after_seconds, "predictive": p.predictive,
        "lead_time_seconds": p.lead_time_seconds, "forecast_quantile": p.forecast_quantile or d.forecast_quantile,
        "cost_ceiling_per_hour": p.cost_ceiling_per_hour, "variants": list(p.variants),
        "slo_ttft_ms": p.slo_ttft_ms,
        "sizing": p.sizing or ("erlang" if (p.slo_ttft_ms or ((p.metric or d.metric) == "ttft" and p.target))
                               else "little"),
        "sizing_quantile": p.sizing_quantile or d.sizing_quantile,
        "nowcast": p.nowcast if p.HasField("nowcast") else d.nowcast,
        "catch_up": p.catch_up if p.HasField("catch_up") else d.catch_up,
    }


def status_to_dict(st: S.AutoscalerStatus) -> dict[str, Any]:
    from mesh.client import timestamp
    return {"desired": st.desired, "mode": st.mode, "reason": st.reason, "bound_by": st.bound_by,
            "last_scale_at": timestamp(st, "last_scale_at"), "observed_at": timestamp(st, "observed_at"),
            "woken_at": timestamp(st, "woken_at"), "replica_cost_per_hour": st.replica_cost_per_hour,
            "signals": dict(sorted(st.signals.items())), "figures_model": st.figures_model}


def policy_doc(d) -> dict[str, Any]:
    """One deployment's policy and the autoscaler's last decision (a `gpumesh.v1.Deployment` with a policy)."""
    return {"deployment": d.spec.name, "tenant": d.spec.tenant, "model": d.spec.model,
            "replicas": d.spec.replicas, "ready_replicas": d.status.ready_replicas,
            "policy": effective(d.spec.scaling),
            "autoscaler": status_to_dict(d.status.autoscaler) if d.status.HasField("autoscaler") else None}
