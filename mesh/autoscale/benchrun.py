"""The calibrated run of `meshctl bench autoscale`: every policy on the same arrivals, simulated with the
calibrated latency model, and the figures the issue asks for (docs/autoscaling.md, "Autoscaling benchmark")."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mesh.autoscale import demand
from mesh.autoscale.latency import LatencyModel
from mesh.autoscale.planner import ServiceFigures
from mesh.autoscale.scalers import AutoscalerScaler, FixedScaler, OracleForecaster, RateForecaster, peak_replicas
from mesh.autoscale.simulate import percentile, simulate
from mesh.autoscale.types import ScalingPolicy

POLICIES = ("predictive", "reactive", "fixed-peak")


@dataclass(frozen=True)
class BenchSpec:
    rate_scale: float = 1.0
    speedup: float = 1.0
    slo_ttft_s: float = 1.0
    policy: ScalingPolicy = ScalingPolicy(min_replicas=1, max_replicas=64, target=0.7)
    predictive_target: float = 0.0         # 0: the policy's target (the same for both autoscalers)
    tick_s: float = 2.0
    seed: int = 0
    season: int = 0                        # forecast season in buckets (0: a day of buckets, else an hour)
    refit_every: int = 10                  # buckets between forecast refits
    level: float = 0.9                     # the forecast interval's coverage (its upper edge is used)
    models: tuple[str, ...] = ("naive", "snaive", "damped")
    max_history: int = 600
    replica_cost_per_hour: float = 0.0
    tune_targets: tuple[float, ...] = ()   # per autoscaling policy: run each, keep the best reaching slo_goal
    slo_goal: float = 0.99
    sizing: str = "erlang"                 # the predictive policy's rule for the forecast rate (mesh/autoscale/sizing.py)
    sizing_quantile: float = 0.7           # erlang: P(wait > the SLO's room) <= 1 - this; poisson: P(busy) <= 1 - this
    nowcast: bool = True                   # predictive: the forecast rate never below the bucket under way's so far
    forecast: str = "fitted"               # "fitted" | "oracle" (the realized bucket rates: a bound, not a policy)
    catch_up: bool = True                  # predictive: median floor and no scale-down delay when the reactive
    #                                        want catches a burst within the SLO's room (mesh/autoscale/scalers.py)


def _season(spec: BenchSpec, series: demand.Series) -> int:
    if spec.season:
        return spec.season
    per_day = max(1, round(86400 / series.step_s))
    per_hour = max(1, round(3600 / series.step_s))
    return per_day if len(series.t) >= 3 * per_day else per_hour


def bench_policy(policy: ScalingPolicy, spec: BenchSpec, model: LatencyModel, predictive: bool) -> ScalingPolicy:
    """The autoscaling policy a bench run gives the Planner: the spec's target per slot x the slots, and the
    spec's SLO and sizing settings in the policy's own fields (what a deployment's policy sets live)."""
    return replace(policy, predictive=predictive, target=policy.target * model.slots,
                   slo_ttft_ms=spec.slo_ttft_s * 1000, sizing=spec.sizing, sizing_quantile=spec.sizing_quantile,
                   nowcast=spec.nowcast, catch_up=spec.catch_up)


def figures_of(model: LatencyModel) -> ServiceFigures:
    """The calibration's figures, as sizing needs them."""
    return ServiceFigures(service_s=model.service_s(), ttft_s=model.ttft_s(), slots=model.slots,
                          cold_start_s=model.cold_start_s)


def run_policy(name: str, arrivals: np.ndarray, series: demand.Series, model: LatencyModel, spec: BenchSpec,
               on_tick=None, cache: dict | None = None) -> dict:
    """One policy's figures on ``arrivals`` (bench seconds)."""
    service = model.service_s()
    end_s = series.duration_s / spec.speedup
    starts, lam = demand.rates(series, spec.rate_scale, spec.speedup)
    policy = spec.policy
    forecaster = None
    if name == "fixed-peak":
        n = peak_replicas(float(lam.max()), service, policy.target * model.slots, policy.max_replicas)
        scaler = FixedScaler(n)
        initial = n
    elif name in ("reactive", "predictive"):
        predictive = name == "predictive"
        if predictive and spec.predictive_target:
            policy = replace(policy, target=spec.predictive_target)
        policy = bench_policy(policy, spec, model, predictive)
        if predictive:
            bucket = series.step_s / spec.speedup
            lead = policy.lead_time_s or model.cold_start_s + spec.tick_s
            season = _season(spec, series)
            if spec.forecast == "oracle":
                forecaster = OracleForecaster(bucket, lead, arrivals, end_s)
            else:
                forecaster = RateForecaster(bucket, lead, season=season, level=spec.level,
                                            refit_every=spec.refit_every, max_history=spec.max_history, cache=cache,
                                            min_history=min(2 * season + 20, max(40, 2 * season)), models=spec.models)
        scaler = AutoscalerScaler(policy, figures=figures_of(model), replica_cost_per_hour=spec.replica_cost_per_hour,
                                  forecaster=forecaster, tick_s=spec.tick_s)
        initial = max(policy.min_replicas, peak_replicas(float(lam[0]), service, policy.target, policy.max_replicas))
    else:
        raise ValueError(f"policy {name!r}: allowed {', '.join(POLICIES)}")
    r = simulate(arrivals, model, scaler, slo_ttft_s=spec.slo_ttft_s, end_s=end_s, tick_s=spec.tick_s,
                 initial_replicas=initial, warm_start=True, on_tick=on_tick)
    slice_hours = r.slice_hours
    met = r.met_slo
    out = {
        "requests": r.requests,
        "slo_attainment": round(r.slo_attainment, 5),
        "goodput_per_slice_hour": round(met / slice_hours, 3) if slice_hours > 0 else 0.0,
        "slice_hours": round(slice_hours, 5),
        "cost": round(slice_hours * spec.replica_cost_per_hour, 5),
        "cold_start_misses": r.cold_start_misses,
        "scale_events": r.scale_events,
        "forecast_error": None,
        "goodput": met,
        "ttft_p50_ms": round(1000 * percentile(r.ttft_s, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(r.ttft_s, 99), 1),
        "max_replicas": r.max_replicas,
        "mean_replicas": round(r.slice_seconds / r.end_s, 3) if r.end_s else 0.0,
        "target_per_replica": policy.target,
    }
    if isinstance(scaler, AutoscalerScaler):
        out["decisions"] = dict(sorted(scaler.decisions.items()))
    if forecaster is not None:
        bucket = series.step_s / spec.speedup
        n_buckets = int(math.ceil(end_s / bucket))
        counts = np.bincount(np.minimum((arrivals // bucket).astype(int), n_buckets - 1), minlength=n_buckets)
        err = forecaster.log.error(counts / bucket)
        out["forecast_error"] = {**err, "lead_time_s": round(forecaster.lead_s, 3), "season": forecaster.season,
                                 "bucket_s": round(bucket, 3)}
        out["sizing"] = {"forecast": spec.forecast, "rule": spec.sizing, "quantile": spec.sizing_quantile,
                         "wait_s": round(max(0.0, spec.slo_ttft_s - model.ttft_s()), 4),
                         "nowcast": spec.nowcast, "reaction_s": round(scaler.reaction_s, 4),
                         "catch_up": scaler.catching_up, "floor_quantile": scaler.floor_quantile,
                         "scale_down_delay_s": 0.0 if scaler.catching_up else policy.scale_down_delay_s}
    return out


def cold_start_info(model: LatencyModel) -> dict:
    """Which cold start the run used and where each part came from."""
    src = model.source or {}
    return {"cold_start_s": round(model.cold_start_s, 4), "slice_create_s": round(model.slice_create_s, 4),
            "load_s": round(model.load_s, 4),
            "slice_create_from": src.get("slice_create_from")
            or f"calibration (measured: {src.get('slice_create', 'Allocate to READY')})",
            "load_from": src.get("load_from") or f"calibration (measured: {src.get('backend', 'the real backend')})"}


def with_slice_create(model: LatencyModel, seconds: float, why: str) -> LatencyModel:
    """The model with the hardware part of the cold start (slice creation) set to ``seconds``; the model load
    and serving latencies stay the calibration's."""
    if not (math.isfinite(seconds) and 0 <= seconds <= 3600):
        raise ValueError(f"slice_create_s {seconds!r}: must be between 0 and 3600 seconds")
    source = {**(model.source or {}), "slice_create_from": why,
              "slice_create_measured_s": model.slice_create_s}
    return replace(model, slice_create_s=float(seconds), source=source)


def compare(policies: dict[str, dict]) -> dict:
    """The issue's goals, computed from the figures (absent when a policy did not run)."""
    c = {}
    p, r, f = policies.get("predictive"), policies.get("reactive"), policies.get("fixed-peak")
    if p and r:
        c["predictive_vs_reactive"] = {
            "goodput_per_slice_hour_ratio": round(p["goodput_per_slice_hour"] / r["goodput_per_slice_hour"], 4)
            if r["goodput_per_slice_hour"] else None,
            "cold_start_miss_reduction": round(1 - p["cold_start_misses"] / r["cold_start_misses"], 4)
            if r["cold_start_misses"] else None,
            "slo_attainment": [p["slo_attainment"], r["slo_attainment"]],
        }
    if p and f:
        c["predictive_vs_fixed_peak"] = {
            "slice_hours_reduction": round(1 - p["slice_hours"] / f["slice_hours"], 4) if f["slice_hours"] else None,
            "slo_attainment": [p["slo_attainment"], f["slo_attainment"]],
        }
    return c


def tune(name: str, arrivals: np.ndarray, series: demand.Series, model: LatencyModel, spec: BenchSpec,
         progress=None, cache: dict | None = None) -> dict:
    """Run ``name`` at each of ``spec.tune_targets`` and keep the one with the most goodput per slice-hour
    among those that reach ``spec.slo_goal`` attainment (else the one with the best attainment)."""
    sweep = []
    for target in spec.tune_targets:
        s = replace(spec, policy=replace(spec.policy, target=target), predictive_target=0.0)
        if progress is not None:
            progress(f"{name}: target {target:g} per replica")
        r = run_policy(name, arrivals, series, model, s, cache=cache)
        sweep.append((target, r))
    ok = [(t, r) for t, r in sweep if r["slo_attainment"] >= spec.slo_goal]
    if ok:
        target, best = max(ok, key=lambda tr: tr[1]["goodput_per_slice_hour"])
    else:
        target, best = max(sweep, key=lambda tr: (tr[1]["slo_attainment"], tr[1]["goodput_per_slice_hour"]))
    return {**best, "tuned": {"slo_goal": spec.slo_goal, "target": target, "met_goal": bool(ok),
                              "sweep": [{"target": t, "slo_attainment": r["slo_attainment"],
                                         "goodput_per_slice_hour": r["goodput_per_slice_hour"],
                                         "slice_hours": r["slice_hours"], "cold_start_misses": r["cold_start_misses"]}
                                        for t, r in sweep]}}


def run(series: demand.Series, model: LatencyModel, spec: BenchSpec, policies: tuple[str, ...],
        progress=None) -> dict:
    arrivals = demand.arrivals(series, spec.rate_scale, spec.speedup, spec.seed)
    _, lam = demand.rates(series, spec.rate_scale, spec.speedup)
    results = {}
    cache: dict = {}
    end_s = series.duration_s / spec.speedup
    for name in policies:
        tick = None
        if progress is not None:
            last = [-1]

            def tick(now: float, name=name, last=last) -> None:
                pct = int(100 * min(1.0, now / end_s))
                if pct // 10 != last[0] // 10:
                    last[0] = pct
                    progress(f"{name}: {pct}% of the series simulated")
        if name != "fixed-peak" and spec.tune_targets:
            results[name] = tune(name, arrivals, series, model, spec, progress, cache=cache)
        else:
            results[name] = run_policy(name, arrivals, series, model, spec, on_tick=tick, cache=cache)
    return {
        "mode": "calibrated",
        "policies": results,
        "comparison": compare(results),
        "series": {"path": series.path, "points": int(len(series.t)), "step_s": series.step_s,
                   "duration_s": round(end_s, 3), "rate_scale": spec.rate_scale, "speedup": spec.speedup,
                   "peak_rate_rps": round(float(lam.max()), 4), "mean_rate_rps": round(float(lam.mean()), 4),
                   "arrivals": int(len(arrivals)), "seed": spec.seed},
        "slo_ttft_ms": round(spec.slo_ttft_s * 1000, 3),
        "calibration": model.to_dict(),
        "cold_start": cold_start_info(model),
        "policy": {k: getattr(spec.policy, k) for k in ("min_replicas", "max_replicas", "metric", "target",
                                                       "stable_window_s", "panic_window_s", "panic_threshold",
                                                       "scale_down_delay_s", "max_scale_up_rate",
                                                       "scale_to_zero_after_s")},
        "replica_cost_per_hour": spec.replica_cost_per_hour,
        "predictive_target": spec.predictive_target or None,
    }
