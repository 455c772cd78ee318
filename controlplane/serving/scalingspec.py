"""Checking a deployment's scaling policy (gpumesh.v1.ScalingPolicy) and turning it into the autoscaler's
`mesh.autoscale.ScalingPolicy` with its defaults.

Every refusal is InvalidArgument naming the field (`spec.scaling.min_replicas`) and what is allowed. The
cost ceiling is checked against one replica's cost (controlplane/serving/replicacost.py), which the caller
works out from the deployment's slice and the control plane's price table: a ceiling below it could never
run a single replica.
"""

from __future__ import annotations

import math

from gpumesh.v1 import scaling_pb2 as S
from mesh import errors
from mesh.autoscale import METRICS, SIZINGS, ScalingPolicy

MAX_REPLICAS = 64
PREFIX = "spec.scaling"
DEFAULTS = ScalingPolicy()
# metric -> (largest target, its unit)
TARGET_LIMITS = {"concurrency": (10000.0, "requests in flight per replica"),
                 "queue": (10000.0, "requests waiting per replica"),
                 "kv_cache": (1.0, "KV-cache use per replica, 0-1"),
                 "ttft": (600000.0, "milliseconds to the first token")}
MAX_COST = 1e6
MAX_VARIANTS = 8
MAX_SLO_MS = 600000.0


def _bad(field: str, problem: str, allowed: str, prefix: str) -> errors.InvalidArgument:
    return errors.InvalidArgument.of(f"{prefix}.{field}", problem, allowed)


def _number(p: S.ScalingPolicy, field: str, lo: float, hi: float, allowed: str, prefix: str, *,
            zero_ok: bool = True) -> None:
    x = getattr(p, field)
    if zero_ok and x == 0:
        return
    if not math.isfinite(x) or not lo <= x <= hi:
        problem = f"{x:g} is negative" if x < 0 else f"{x:g} is out of range"
        raise _bad(field, problem, allowed, prefix)


def check(p: S.ScalingPolicy, *, replica_cost: float | None = None, variants: tuple[str, ...] | None = None,
          prefix: str = PREFIX) -> S.ScalingPolicy:
    """`p` if it is a valid policy, else InvalidArgument naming the field. `replica_cost` (dollars per hour
    of one replica; None: unknown, no check) bounds the cost ceiling from below; `variants` (the model's
    variant names; None: not checked) bounds `variants`."""
    lo = p.min_replicas if p.HasField("min_replicas") else DEFAULTS.min_replicas
    if not 0 <= lo <= MAX_REPLICAS:
        raise _bad("min_replicas", f"{lo} is out of range", f"0 to {MAX_REPLICAS}", prefix)
    if not 1 <= p.max_replicas <= MAX_REPLICAS:
        raise _bad("max_replicas", f"{p.max_replicas} is out of range" if p.max_replicas else "is required",
                   f"1 to {MAX_REPLICAS}", prefix)
    if lo > p.max_replicas:
        raise _bad("min_replicas", f"{lo} is more than max_replicas {p.max_replicas}",
                   f"0 to max_replicas ({p.max_replicas})", prefix)
    metric = p.metric or DEFAULTS.metric
    if metric not in METRICS:
        raise _bad("metric", f"unknown metric {p.metric[:64]!r}", ", ".join(METRICS), prefix)
    top, unit = TARGET_LIMITS[metric]
    if not math.isfinite(p.target) or not 0 < p.target <= top:
        raise _bad("target", "is required" if p.target == 0 else f"{p.target:g} is out of range for {metric}",
                   f"> 0 and at most {top:g} ({unit})", prefix)
    _number(p, "stable_window_seconds", 1, 3600, "1 to 3600 seconds (0: 60)", prefix)
    stable = p.stable_window_seconds or DEFAULTS.stable_window_s
    _number(p, "panic_window_seconds", 0.1, stable, f"0.1 seconds up to the stable window ({stable:g}s); 0: "
            f"{DEFAULTS.panic_window_s:g}", prefix)
    if not p.panic_window_seconds and DEFAULTS.panic_window_s > stable:
        raise _bad("panic_window_seconds", f"the default {DEFAULTS.panic_window_s:g}s is longer than the stable "
                   f"window ({stable:g}s)", f"0.1 to {stable:g} seconds", prefix)
    _number(p, "panic_threshold", 1, 100, "1 to 100 times the ready capacity (0: 2)", prefix)
    _number(p, "scale_up_delay_seconds", 0, 3600, "0 to 3600 seconds", prefix)
    if p.HasField("scale_down_delay_seconds"):
        _number(p, "scale_down_delay_seconds", 0, 86400, "0 to 86400 seconds", prefix, zero_ok=False)
    _number(p, "max_scale_up_rate", 1, 1000, "1 to 1000 times the ready replicas (0: 10)", prefix)
    _number(p, "scale_to_zero_after_seconds", 1, 604800, "0 (never) or 1 to 604800 seconds", prefix)
    if p.scale_to_zero_after_seconds and lo != 0:
        raise _bad("scale_to_zero_after_seconds", f"scale to zero needs min_replicas 0 (it is {lo})",
                   "0 unless min_replicas is 0", prefix)
    _number(p, "lead_time_seconds", 0, 3600, "0 (the measured cold start) to 3600 seconds", prefix)
    if p.forecast_quantile and not (0.5 < p.forecast_quantile < 1):
        raise _bad("forecast_quantile", f"{p.forecast_quantile:g} is out of range",
                   "above 0.5 and below 1 (0: 0.9)", prefix)
    if not math.isfinite(p.cost_ceiling_per_hour) or not 0 <= p.cost_ceiling_per_hour <= MAX_COST:
        raise _bad("cost_ceiling_per_hour", f"{p.cost_ceiling_per_hour:g} is out of range",
                   f"0 (none) or a number of dollars per hour up to {MAX_COST:g}", prefix)
    if p.cost_ceiling_per_hour and replica_cost is not None and p.cost_ceiling_per_hour < replica_cost - 1e-9:
        raise _bad("cost_ceiling_per_hour", f"${p.cost_ceiling_per_hour:.4f}/h is below one replica's cost "
                   f"(${replica_cost:.4f}/h for its slice at the configured GPU prices)",
                   f"0 (none) or at least {replica_cost:.4f}", prefix)
    if not math.isfinite(p.slo_ttft_ms) or not 0 <= p.slo_ttft_ms <= MAX_SLO_MS:
        raise _bad("slo_ttft_ms", f"{p.slo_ttft_ms:g} is negative" if p.slo_ttft_ms < 0 else
                   f"{p.slo_ttft_ms:g} is out of range", f"0 (none) or milliseconds up to {MAX_SLO_MS:g}", prefix)
    if p.sizing and p.sizing not in SIZINGS:
        raise _bad("sizing", f"unknown sizing rule {p.sizing[:64]!r}", ", ".join(SIZINGS) + " (unset: erlang with "
                   "an objective, else little)", prefix)
    objective = p.slo_ttft_ms or (p.target if metric == "ttft" else 0.0)
    if p.sizing == "erlang" and not objective:
        raise _bad("sizing", "erlang sizes for the objective's room to queue and the policy has no objective",
                   "set slo_ttft_ms (or use poisson or little)", prefix)
    if not math.isfinite(p.sizing_quantile) or (p.sizing_quantile and not 0 < p.sizing_quantile < 1):
        raise _bad("sizing_quantile", f"{p.sizing_quantile:g} is out of range",
                   f"above 0 and below 1 (0: {DEFAULTS.sizing_quantile:g})", prefix)
    if len(p.variants) > MAX_VARIANTS:
        raise _bad("variants", f"{len(p.variants)} names", f"at most {MAX_VARIANTS}", prefix)
    for i, v in enumerate(p.variants):
        if variants is not None and v not in variants:
            raise _bad(f"variants[{i}]", f"the model has no variant {v[:64]!r}", ", ".join(variants), prefix)
    return p


def to_policy(p: S.ScalingPolicy) -> ScalingPolicy:
    """The autoscaler's policy from a checked message, unset fields at their defaults."""
    d = DEFAULTS
    return ScalingPolicy(
        min_replicas=p.min_replicas if p.HasField("min_replicas") else d.min_replicas,
        max_replicas=p.max_replicas, metric=p.metric or d.metric, target=p.target,
        stable_window_s=p.stable_window_seconds or d.stable_window_s,
        panic_window_s=p.panic_window_seconds or d.panic_window_s,
        panic_threshold=p.panic_threshold or d.panic_threshold,
        scale_up_delay_s=p.scale_up_delay_seconds,
        scale_down_delay_s=(p.scale_down_delay_seconds if p.HasField("scale_down_delay_seconds")
                            else d.scale_down_delay_s),
        max_scale_up_rate=p.max_scale_up_rate or d.max_scale_up_rate,
        scale_to_zero_after_s=p.scale_to_zero_after_seconds, predictive=p.predictive,
        lead_time_s=p.lead_time_seconds, forecast_quantile=p.forecast_quantile or d.forecast_quantile,
        cost_ceiling_per_hour=p.cost_ceiling_per_hour, variants=tuple(p.variants),
        slo_ttft_ms=p.slo_ttft_ms, sizing=p.sizing, sizing_quantile=p.sizing_quantile or d.sizing_quantile,
        nowcast=p.nowcast if p.HasField("nowcast") else d.nowcast,
        catch_up=p.catch_up if p.HasField("catch_up") else d.catch_up)


def scales_to_zero(p: S.ScalingPolicy) -> bool:
    return p.scale_to_zero_after_seconds > 0 and p.HasField("min_replicas") and p.min_replicas == 0


def describe(p: S.ScalingPolicy) -> str:
    """One line: `1-4 replicas, concurrency 4/replica, windows 60s/6s, down after 120s, ...`."""
    a = to_policy(p)
    parts = [f"{a.min_replicas}-{a.max_replicas} replicas", f"{a.metric} {a.target:g}/replica",
             f"windows {a.stable_window_s:g}s/{a.panic_window_s:g}s", f"down after {a.scale_down_delay_s:g}s"]
    if a.scale_to_zero_after_s:
        parts.append(f"to zero after {a.scale_to_zero_after_s:g}s idle")
    if a.slo_ttft_ms:
        parts.append(f"TTFT objective {a.slo_ttft_ms:g} ms")
    if a.predictive:
        parts.append(f"predictive q{a.forecast_quantile:g}" + (f" lead {a.lead_time_s:g}s" if a.lead_time_s else "")
                     + f", {a.sizing_rule} sizing" + (f" q{a.sizing_quantile:g}" if a.sizing_rule != "little" else "")
                     + ("" if a.nowcast else ", no nowcast") + ("" if a.catch_up else ", no catch-up"))
    if a.cost_ceiling_per_hour:
        parts.append(f"ceiling ${a.cost_ceiling_per_hour:g}/h")
    return ", ".join(parts)
