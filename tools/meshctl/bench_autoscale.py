"""`meshctl bench autoscale`: autoscaling policies on the same demand series, in one run.

A request-rate series (any CSV: a time column and a value column) becomes Poisson arrivals; each policy
(predictive, reactive, fixed-peak) serves the same arrivals. In calibrated mode (the default) a discrete-event
simulation stands in for the replicas, with a latency model fitted to the real llama.cpp backend's measured
figures (cold start = slice creation + model load, TTFT vs prompt, per-token time; the calibration JSON
shipped in mesh/autoscale/data/, or your own with --calibration; --calibrate-out FILE measures and writes
one). docs/autoscaling.md, "Autoscaling benchmark", says what each figure means.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

from tools.meshctl.common import info, out, positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl bench autoscale --series ../shared/traces/helios-earth-2020/vc6YE_cluster_sequence_vc.csv \\
      --time-col time --value-col total_job_num --rate-scale 0.05 --limit 4320 -o json
  meshctl bench autoscale --series qps.csv --time-col timestamp_anon --value-col value --rate-scale 0.2
  meshctl bench autoscale --series s.csv --time-col t --value-col rps --policy reactive,fixed-peak --slo-ttft 800
  meshctl bench autoscale --calibrate-out my-calibration.json          # measure the real backend, write the fit
  meshctl bench autoscale --series s.csv --time-col t --value-col rps --calibration my-calibration.json
  meshctl bench autoscale --series s.csv --time-col t --value-col rps --slice-create-s 28.83   # GPU host's MIG creation
  meshctl bench autoscale --series s.csv --time-col t --value-col rps --catch-up off --nowcast off \\
      --sizing-quantile 0.97                # the predictive policy before catch-up and the nowcast
  meshctl bench autoscale --series s.csv --time-col t --value-col rps --forecast oracle \\
      --policy predictive                   # a bound: the realized rates as the forecast

Prints per policy: requests, slo_attainment, goodput_per_slice_hour (requests that met the TTFT SLO per
slice-hour), slice_hours, cost (dollars: slice-hours x the slice's price from the control plane's default
gpu_prices), cold_start_misses, scale_events, forecast_error (predictive), plus "mode", the series, the
calibration and the comparison against the issue's goals. Bad input exits 2 naming the problem.
"""

POLICIES = ("predictive", "reactive", "fixed-peak")


def register(kinds: argparse._SubParsersAction) -> None:
    p = subcommand(kinds, "autoscale", help="autoscaling policies on a demand series (SLO, slice-hours, cost)",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--series", metavar="FILE", help="CSV of the request-rate series")
    p.add_argument("--time-col", metavar="C", help="its time column (seconds, or ISO date-times)")
    p.add_argument("--value-col", metavar="C", help="its value column (rows at one time are summed)")
    p.add_argument("--rate-scale", type=positive_float, default=1.0, metavar="K",
                   help="requests per second per unit of the value (default: 1)")
    p.add_argument("--speedup", type=positive_float, default=1.0, metavar="X",
                   help="compress the series' time X times, at the same request rate (default: 1)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="use the first N points")
    p.add_argument("--policy", default=",".join(POLICIES), metavar="P[,P...]",
                   help=f"policies to run, of {', '.join(POLICIES)} (default: all)")
    p.add_argument("--slo-ttft", type=positive_float, default=None, metavar="MS",
                   help="the time-to-first-token objective (default: 3x the calibrated TTFT on a free slot, "
                        "i.e. the wait for about two requests ahead)")
    p.add_argument("--mode", choices=("calibrated", "real"), default="calibrated",
                   help="calibrated: simulated clock and calibrated backend stand-in (default); real: a local "
                        "cluster with real backends at real time (short series only)")
    p.add_argument("--calibration", metavar="FILE", help="latency model JSON (default: the shipped one, "
                   "measured on SmolLM2-135M with llama.cpp)")
    p.add_argument("--calibrate-out", metavar="FILE",
                   help="measure the real backend now, fit the latency model, write it here (and use it)")
    p.add_argument("--slice-create-s", type=float, default=None, metavar="S",
                   help="seconds a slice takes to create on the GPU host (MIG GPU + compute instance, device "
                        "bring-up): replaces the calibration's measured figure, which on this host's simulated GPU "
                        "is milliseconds; the model load and serving latencies stay the calibration's "
                        "(calibrated mode only; default: the calibration's)")
    p.add_argument("--model-file", metavar="GGUF", help="the GGUF to calibrate on (default: the demo SmolLM2)")
    g = p.add_argument_group("policy (both autoscalers)")
    g.add_argument("--target", type=positive_float, default=0.7, metavar="N",
                   help="in-flight requests per replica slot to aim for (default: 0.7)")
    g.add_argument("--predictive-target", type=positive_float, default=None, metavar="N",
                   help="the predictive policy's target, when it differs (default: --target)")
    g.add_argument("--tune-targets", default="", metavar="N[,N...]",
                   help="run each autoscaling policy at each of these targets and report the one with the most "
                        "goodput per slice-hour that reaches --slo-goal (fixed-peak uses --target)")
    g.add_argument("--slo-goal", type=float, default=0.99, metavar="Q",
                   help="the SLO attainment --tune-targets must reach (default: 0.99)")
    g.add_argument("--min-replicas", type=int, default=1, metavar="N", help="(default: 1)")
    g.add_argument("--max-replicas", type=positive_int, default=64, metavar="N", help="(default: 64)")
    g.add_argument("--stable-window", type=positive_float, default=60.0, metavar="S", help="(default: 60)")
    g.add_argument("--panic-window", type=positive_float, default=6.0, metavar="S", help="(default: 6)")
    g.add_argument("--panic-threshold", type=positive_float, default=2.0, metavar="X", help="(default: 2)")
    g.add_argument("--scale-down-delay", type=float, default=120.0, metavar="S", help="(default: 120)")
    g.add_argument("--scale-to-zero-after", type=float, default=0.0, metavar="S",
                   help="idle seconds before 0 replicas, with --min-replicas 0 (default: 0, never)")
    g.add_argument("--tick", type=positive_float, default=2.0, metavar="S",
                   help="seconds between decisions (default: 2, Knative's tick)")
    f = p.add_argument_group("forecast (predictive)")
    f.add_argument("--season", type=int, default=0, metavar="POINTS",
                   help="season in series points (default: a day when the series has 3, else an hour)")
    f.add_argument("--refit-every", type=positive_int, default=10, metavar="POINTS", help="(default: 10)")
    f.add_argument("--level", type=float, default=0.9, metavar="Q",
                   help="the forecast interval's coverage; its upper edge is provisioned for (default: 0.9)")
    f.add_argument("--sizing", choices=("erlang", "poisson", "little"), default="erlang",
                   help="how the forecast's upper rate becomes replicas: erlang = fewest replicas whose queueing "
                        "wait stays within the SLO's room at --sizing-quantile (Erlang C, for the Poisson bursts "
                        "inside a bucket); poisson = slots for the quantile of Poisson concurrency; little = rate x "
                        "service time / target (default: erlang)")
    f.add_argument("--sizing-quantile", type=float, default=0.7, metavar="Q",
                   help="the quantile --sizing erlang|poisson provisions for (default: 0.7, tuned on the GenAI "
                        "trace: docs/autoscaling.md)")
    f.add_argument("--nowcast", choices=("on", "off"), default="on",
                   help="on: the predictive policy's forecast rate is never below the rate seen so far in the "
                        "series point under way, once a third of it has passed (default: on)")
    f.add_argument("--catch-up", choices=("auto", "off"), default="auto",
                   help="auto: when the cold start plus a tick is within the SLO's room to queue, the predictive "
                        "policy's reactive want catches a burst in time, so its forecast floor is sized at the "
                        "median and it scales down without --scale-down-delay; off: always the floor at "
                        "--sizing-quantile and the delay (the sizing before) (default: auto)")
    f.add_argument("--forecast", choices=("fitted", "oracle"), default="fitted",
                   help="fitted: forecast the rate from the buckets seen so far (the product's way); oracle: the "
                        "realized rate of each bucket, known ahead, a bound on what a better forecast could give, "
                        "not a policy (default: fitted)")
    c = p.add_argument_group("cost")
    c.add_argument("--gpu-model", default="H100-80GB", metavar="MODEL", help="(default: H100-80GB)")
    c.add_argument("--profile", default="1g.10gb", metavar="MIG", help="a replica's slice (default: 1g.10gb)")
    p.add_argument("--seed", type=int, default=0, help="arrival randomness (default: 0)")
    p.set_defaults(func=run_autoscale_bench)


class BadInput(Exception):
    """Bad flags or series: exit 2 with the message."""


def _policies(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in POLICIES]
    if not names or bad:
        raise BadInput(f"--policy {text!r}: unknown {', '.join(bad) or 'empty list'}; allowed: {', '.join(POLICIES)}")
    return tuple(dict.fromkeys(names))


def _replica_cost(gpu_model: str, profile: str) -> float:
    from controlplane.config import ControlPlaneConfig
    from mesh import gpumodels
    from mesh.cost import slice_share
    try:
        model = gpumodels.get_model(gpu_model)
    except KeyError:
        raise BadInput(f"--gpu-model {gpu_model!r}: unknown; allowed: {', '.join(gpumodels.model_names())}") from None
    try:
        model.profile(profile)
    except KeyError:
        raise BadInput(f"--profile {profile!r}: not a MIG profile of {model.name}") from None
    share = slice_share(1, model.name, profile=profile)
    return share * ControlPlaneConfig().price_table().gpu_hour(model.name)


def _spec(args: argparse.Namespace):
    from mesh.autoscale.benchrun import BenchSpec
    from mesh.autoscale.types import ScalingPolicy
    for flag, value in (("--min-replicas", args.min_replicas), ("--scale-down-delay", args.scale_down_delay),
                        ("--scale-to-zero-after", args.scale_to_zero_after), ("--season", args.season)):
        if value < 0 or not math.isfinite(value):
            raise BadInput(f"{flag} {value!r}: must be >= 0")
    if args.min_replicas > args.max_replicas:
        raise BadInput(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    if not 0 < args.level < 1:
        raise BadInput(f"--level {args.level!r}: must be between 0 and 1")
    policy = ScalingPolicy(min_replicas=args.min_replicas, max_replicas=args.max_replicas, target=args.target,
                           stable_window_s=args.stable_window, panic_window_s=args.panic_window,
                           panic_threshold=args.panic_threshold, scale_down_delay_s=args.scale_down_delay,
                           scale_to_zero_after_s=args.scale_to_zero_after)
    tune: tuple[float, ...] = ()
    if args.tune_targets:
        try:
            tune = tuple(float(x) for x in args.tune_targets.split(",") if x.strip())
        except ValueError:
            raise BadInput(f"--tune-targets {args.tune_targets!r}: not a list of numbers") from None
        if not tune or min(tune) <= 0:
            raise BadInput(f"--tune-targets {args.tune_targets!r}: each target must be > 0")
    if args.slice_create_s is not None:
        if getattr(args, "mode", "calibrated") == "real":
            raise BadInput("--slice-create-s: calibrated mode only (real mode creates real slices)")
        if not (math.isfinite(args.slice_create_s) and 0 <= args.slice_create_s <= 3600):
            raise BadInput(f"--slice-create-s {args.slice_create_s!r}: must be between 0 and 3600 seconds")
    if not 0 < args.sizing_quantile < 1:
        raise BadInput(f"--sizing-quantile {args.sizing_quantile!r}: must be between 0 and 1")
    if not 0 < args.slo_goal <= 1:
        raise BadInput(f"--slo-goal {args.slo_goal!r}: must be in (0, 1]")
    return BenchSpec(tune_targets=tune, slo_goal=args.slo_goal, rate_scale=args.rate_scale, speedup=args.speedup,
                     slo_ttft_s=(args.slo_ttft or 1000.0) / 1000,
                     policy=policy, predictive_target=args.predictive_target or 0.0, tick_s=args.tick,
                     seed=args.seed, season=args.season, refit_every=args.refit_every, level=args.level,
                     sizing=args.sizing, sizing_quantile=args.sizing_quantile,
                     catch_up=getattr(args, "catch_up", "auto") == "auto",
                     nowcast=getattr(args, "nowcast", "on") == "on",
                     forecast=getattr(args, "forecast", "fitted"),
                     replica_cost_per_hour=_replica_cost(args.gpu_model, args.profile))


def _slice_create(args: argparse.Namespace, model):
    """The model with --slice-create-s as the hardware part of the cold start (or unchanged without it)."""
    if args.slice_create_s is None:
        return model
    from mesh.autoscale.benchrun import with_slice_create
    v = args.slice_create_s
    return with_slice_create(model, v, f"--slice-create-s {v:g} (an assumption for a GPU host's MIG instance "
                                       f"creation; the calibration measured {model.slice_create_s:.3f}s on a "
                                       "simulated GPU)")


def run_autoscale_bench(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BadInput as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    from mesh.autoscale import demand
    from mesh.autoscale.latency import LatencyModel, default_model
    from tools.meshctl.output import dump
    from tools.meshctl.progress import Progress
    progress = Progress(args.output)
    policies = _policies(args.policy)
    if args.calibration and args.calibrate_out:
        raise BadInput("--calibration and --calibrate-out: give one (--calibrate-out measures a new one)")
    if not args.series and not args.calibrate_out:
        raise BadInput("--series FILE is required (or --calibrate-out FILE to only calibrate)")
    if args.series and not (args.time_col and args.value_col):
        raise BadInput("--time-col and --value-col are required with --series")
    spec = _spec(args)
    series = None
    if args.series:
        try:
            series = demand.read_series(args.series, args.time_col, args.value_col, limit=args.limit or 0)
        except demand.SeriesError as e:
            raise BadInput(str(e)) from None
    if args.calibrate_out:
        from mesh.autoscale.calibrate import calibrate
        with progress.waiting("calibrating: measuring the real backend") as update:
            try:
                model = calibrate(args.model_file or "", progress=update)
            except (FileNotFoundError, OSError) as e:
                raise BadInput(f"--model-file: {e}") from None
        model.save(args.calibrate_out)
        progress.step(f"calibration written to {args.calibrate_out}")
        if series is None:
            out(dump(model.to_dict(), args.output if args.output in ("json", "yaml") else "json"))
            return 0
    else:
        try:
            model = LatencyModel.load(args.calibration) if args.calibration else default_model()
        except ValueError as e:
            raise BadInput(str(e)) from None
    model = _slice_create(args, model)
    if args.slo_ttft is None:
        spec = replace(spec, slo_ttft_s=round(3 * model.ttft_s(), 3))
    if args.mode == "real":
        from tools.meshctl.bench_autoscale_real import run_real
        doc = run_real(series, model, spec, policies, progress)
    else:
        from mesh.autoscale.benchrun import run
        with progress.waiting("simulating") as update:
            doc = run(series, model, spec, policies, progress=update)
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
        return 0
    from tools.meshctl.output import render_table
    keys = ["requests", "slo_attainment", "goodput_per_slice_hour", "slice_hours", "cost", "cold_start_misses",
            "scale_events", "ttft_p99_ms", "max_replicas"]
    rows = [[name] + [r[k] for k in keys] for name, r in doc["policies"].items()]
    out(render_table(["POLICY"] + [k.upper() for k in keys], rows))
    for name, c in doc["comparison"].items():
        out(f"{name}: " + ", ".join(f"{k}={v}" for k, v in c.items()) + "\n")
    return 0
