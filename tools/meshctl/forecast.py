"""`meshctl forecast`: forecasts of demand and load (docs/prediction.md).

`backtest` runs a rolling-origin backtest on any CSV series, without a cluster: every model is fitted at
each origin on the history before it only, the earlier half of the origins chooses the model (the best
that beats the last value), the later half scores it. It prints per series and model MASE (against the
seasonal naive's in-sample error), sMAPE, pinball loss and the coverage of the conformal intervals.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time

from tools.meshctl.common import CliError, HelpFormatter, info, out, positive_int, subcommand

BACKTEST_EPILOG = """\
examples:
  # Helios VC GPUs in use, 10-minute means, 2 hours ahead, daily season
  meshctl forecast backtest --csv ../shared/traces/helios-earth-2020/vc6YE_cluster_sequence_vc.csv \\
      --time-col time --value-col running_gpu_num --freq 10min --horizon 2h --season 1d -o json
  # GenAI per-container GPU duty cycle, 5-minute means, 30 minutes ahead, 20 containers sampled
  meshctl forecast backtest --csv ../shared/traces/alibaba-genai-2026/pod_gpu_duty_cycle_anon.csv \\
      --time-col timestamp_anon --value-col value --group-col container_ip --freq 5min --agg mean \\
      --fill ffill --horizon 30min --season 1h --max-series 20 --skip-bad
  # the freshest sample: each 10-minute mean's last raw minute feeds latest and linear
  meshctl forecast backtest --csv ../shared/traces/helios-earth-2020/vcSoL_cluster_sequence_vc.csv \
      --time-col time --value-col running_gpu_num --freq 10min --horizon 30min --season 1d --origins 400 \
      --models naive,snaive,ses,latest,linear
  # an already binned series with its freshest reading in a column (forecast concurrency's at_end)
  meshctl forecast backtest --csv openb_gpus_hourly.csv --time-col time --value-col value --recent-col at_end \
      --horizon 1 --season 24 --models naive,snaive,latest,linear
  # write every forecast for independent scoring
  meshctl forecast backtest --csv load.csv --time-col t --value-col v --horizon 12 --season 24 \\
      --models naive,snaive,damped,mstl,lstm --predictions-out preds.csv

--horizon and --season take a number of steps or a duration (30s, 10min, 2h, 1d) that is a whole
number of steps. The default season is one day when the series holds at least three, else none.
Models: naive (last value), snaive (one season ago), ets (AutoETS), damped (damped trend), mstl
(STL season + AutoETS), ses (simple exponential smoothing), theta (AutoTheta), ces (AutoCES), latest
(the freshest raw sample: the last one inside the last bin), linear (a robust linear model of the
change from the last value, per step), lstm (small torch LSTM); the first two are always computed, and ensembles (the
mean of the best two or three) compete unless --no-ensembles. A model is chosen only when it beat the
last value on the selection origins. Bad input (unknown column, non-numeric value, gap, constant or too
short a series) exits with status 2 and names the problem; --skip-bad reports such series and goes on.
--predictions-out writes series,origin,step,time,actual,point,lo,hi,model for every model's forecasts on
the evaluation origins (origin = the time of the last value the forecast saw).
"""

CONCURRENCY_EPILOG = """\
examples:
  # GPUs requested per hour by the Alibaba openb pods (creation to deletion), then a 6-hour backtest
  meshctl forecast concurrency --csv ../shared/traces/alibaba-gpu-v2023/openb_pod_list_default.csv \\
      --start-col creation_time --end-col deletion_time --weight-cols num_gpu,gpu_milli --weight-scale 0.001 \\
      --freq 1h --out openb_gpus_hourly.csv
  meshctl forecast backtest --csv openb_gpus_hourly.csv --time-col time --value-col value --horizon 6 --season 24
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forecast", help="forecasts: from the control plane's history, and backtests on a CSV series",
                       description="Forecasts of demand and load (docs/prediction.md): `get` and `series` ask the "
                                   "control plane's ForecastService about the history it keeps (GPU telemetry, "
                                   "deployment load, Allocate requests per minute), `interactions` reads its "
                                   "interaction log; `backtest` and `concurrency` work on CSV series, without a "
                                   "cluster.", formatter_class=HelpFormatter)
    fsub = p.add_subparsers(dest="forecast_command", metavar="COMMAND", title="commands")
    b = subcommand(fsub, "backtest", help="rolling-origin backtest of the forecasters on a CSV series",
                   description=__doc__.split("\n\n", 1)[1], epilog=BACKTEST_EPILOG, skip=("timeout",))
    b.add_argument("--csv", required=True, action="append", metavar="FILE",
                   help="the CSV file; repeat for several files with the same columns (series named FILE:GROUP)")
    b.add_argument("--time-col", required=True, metavar="C", help="time column: Unix seconds or date-times")
    b.add_argument("--value-col", required=True, metavar="C", help="value column (numbers)")
    b.add_argument("--group-col", metavar="C", help="one series per distinct value of this column")
    b.add_argument("--recent-col", metavar="C",
                   help="the freshest reading at each row (e.g. `forecast concurrency`'s at_end), for the models "
                        "latest and linear; with --freq and --agg mean|max|min the last raw value of each bin "
                        "is used without it")
    b.add_argument("--freq", metavar="F", help="aggregate into bins of this width (1s, 1min, 10min, 1h)")
    b.add_argument("--agg", default="mean", metavar="A", help="bin aggregate: mean, sum, max, min, last, count "
                                                              "(rows per bin) (default: mean)")
    b.add_argument("--fill", default="none", metavar="HOW", help="fill gaps: none (an error), ffill, zero")
    b.add_argument("--season", default="auto", metavar="N|DURATION", help="season length (default: auto)")
    b.add_argument("--horizon", default="1", metavar="N|DURATION", help="steps ahead (default: 1)")
    b.add_argument("--models", default="naive,snaive,damped,mstl", metavar="LIST",
                   help="comma-separated models (default: naive,snaive,damped,mstl)")
    b.add_argument("--origins", type=positive_int, default=40, metavar="N", help="rolling origins (default: 40)")
    b.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="steps between origins (default: the horizon)")
    b.add_argument("--max-history", type=positive_int, default=None, metavar="N",
                   help="points each fit sees (default: max(10 seasons, 50 horizons, 500))")
    b.add_argument("--level", type=float, default=0.9, metavar="X", help="interval level (default: 0.9)")
    b.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="intervals calibrate on the latest N observed origins (default: 0, all of them)")
    b.add_argument("--no-ensembles", action="store_true", help="do not let means of the best models compete")
    b.add_argument("--no-shrink", action="store_true",
                   help="do not let models shrunk toward the last value step by step (shrunk(m)) compete")
    b.add_argument("--aci-gamma", type=float, default=None, metavar="G",
                   help="step of the adaptive interval level (ACI; default: 0.02; 0: a fixed level)")
    b.add_argument("--steady-tolerance", type=float, default=None, metavar="X",
                   help="how much a chosen model may lose to the last value on either half of the selection "
                        "origins (default: 0.05)")
    b.add_argument("--max-series", type=positive_int, default=None, metavar="N",
                   help="backtest a random sample of N series (seeded by --sample-seed)")
    b.add_argument("--sample-seed", type=int, default=0, metavar="S", help="seed of --max-series (default: 0)")
    b.add_argument("--skip-bad", action="store_true", help="report unusable series and go on instead of failing")
    b.add_argument("--jobs", type=positive_int, default=1, metavar="N", help="worker processes (default: 1)")
    b.add_argument("--predictions-out", metavar="FILE", help="write every evaluation forecast as CSV rows")
    b.set_defaults(func=run_backtest)
    c = subcommand(fsub, "concurrency", help="turn a CSV of intervals (requests, pods) into a demand series",
                   description="The time-averaged sum of the weights of the intervals open in each bin, as a CSV "
                               "time,value,at_end (time in the start column's unit, seconds; at_end: the sum "
                               "open at the bin's end, the freshest reading, for --recent-col) for "
                               "`forecast backtest`.",
                   epilog=CONCURRENCY_EPILOG, skip=("timeout",))
    c.add_argument("--csv", required=True, metavar="FILE", help="the CSV of intervals")
    c.add_argument("--start-col", required=True, metavar="C", help="interval start (seconds)")
    c.add_argument("--end-col", required=True, metavar="C", help="interval end (seconds)")
    c.add_argument("--weight-cols", default="", metavar="C[,C...]",
                   help="weight = product of these columns (default: 1)")
    c.add_argument("--weight-scale", type=float, default=1.0, metavar="X", help="multiply the weight by X")
    c.add_argument("--freq", required=True, metavar="SECONDS|DURATION", help="bin width (3600, 1h, 10min)")
    c.add_argument("--out", metavar="FILE", help="write here (default: stdout)")
    c.set_defaults(func=run_concurrency)
    from tools.meshctl import forecast_live
    forecast_live.register(fsub)          # get, series: from the control plane's ForecastService
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def _steps(text: str, step_s: float, flag: str) -> int:
    from mesh.errors import InvalidArgument
    try:
        n = int(text)
    except ValueError:
        import pandas as pd
        try:
            seconds = pd.Timedelta(text).total_seconds()
        except ValueError:
            raise InvalidArgument.of(flag, f"not a number of steps or a duration: {text!r}",
                                     "an integer, or 30s, 10min, 2h, 1d") from None
        if not step_s or abs(seconds / step_s - round(seconds / step_s)) > 1e-9 or seconds <= 0:
            raise InvalidArgument.of(flag, f"{text} is not a whole number of {step_s:g}-second steps")
        n = round(seconds / step_s)
    if n < 1:
        raise InvalidArgument.of(flag, f"must be >= 1, got {text}")
    return n


def _auto_season(step_s: float, points: int) -> int:
    day = 86400 / step_s if step_s else 0
    return int(day) if day >= 2 and day == int(day) and points >= 3 * day else 1


def _spec(args, series):
    from mesh.errors import InvalidArgument
    from mesh.forecast import BacktestSpec, REGISTRY
    from mesh.forecast.series import step_seconds
    step_s = step_seconds(series[0])
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for m in models:
        if m not in REGISTRY:
            raise InvalidArgument.of("models", f"unknown model {m!r}", ", ".join(REGISTRY))
    if not 0 < args.level < 1:
        raise InvalidArgument.of("level", f"must be between 0 and 1, got {args.level}")
    season = (_auto_season(step_s, max(len(s.values) for s in series)) if args.season == "auto"
              else _steps(args.season, step_s, "season"))
    return BacktestSpec(horizon=_steps(args.horizon, step_s, "horizon"), season=season, models=models,
                        origins=args.origins, stride=args.stride or 0, max_history=args.max_history or 0,
                        level=args.level, ensembles=not args.no_ensembles,
                        calibration=max(0, args.calibration), **_rule_options(args)), step_s


def _rule_options(args) -> dict:
    """--no-shrink, --aci-gamma, --steady-tolerance as BacktestSpec fields (only those given)."""
    from mesh.errors import InvalidArgument
    out: dict = {}
    if getattr(args, "no_shrink", False):
        out["shrink"] = False
    for flag, field in (("aci_gamma", "aci_gamma"), ("steady_tolerance", "steady_tolerance")):
        v = getattr(args, flag, None)
        if v is not None:
            if not 0 <= v < 1:
                raise InvalidArgument.of(flag.replace("_", "-"), f"must be >= 0 and < 1, got {v:g}")
            out[field] = v
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished worker processes (--jobs)."""
    import os
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_backtest(args: argparse.Namespace) -> int:
    from mesh.errors import InvalidArgument
    try:
        return _run(args)
    except InvalidArgument as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    from mesh.forecast import report
    from mesh.forecast.backtest import check_series
    from mesh.forecast.series import load
    from mesh.errors import InvalidArgument
    quiet = args.output in ("json", "yaml") or not sys.stderr.isatty()
    import os
    series = []
    for path in args.csv:
        part = load(path, args.time_col, args.value_col, args.group_col, args.freq, args.agg, args.fill,
                    recent_col=args.recent_col)
        if len(args.csv) > 1:
            stem = os.path.splitext(os.path.basename(path))[0]
            for s in part:
                s.name = f"{stem}:{s.name}" if args.group_col else stem
        series += part
    if args.max_series and len(series) > args.max_series:
        keep = set(random.Random(args.sample_seed).sample(range(len(series)), args.max_series))
        series = [s for i, s in enumerate(series) if i in keep]
    spec, step_s = _spec(args, series)
    bad = []
    for s in series:          # fail fast, before any fitting
        try:
            check_series(s.values, spec, what=f"series {s.name!r}")
        except InvalidArgument as exc:
            if not args.skip_bad:
                raise
            bad.append({"series": s.name, "error": exc.message})
    good = [s for s in series if s.name not in {b["series"] for b in bad}]
    done = [0]

    def progress(r: dict) -> None:
        done[0] += 1
        if not quiet:
            what = r.get("error") or f"chose {r['chosen']}, MASE {r['models'][r['chosen']]['mase']:.3f}"
            info(f"[{done[0]}/{len(good)}] {r['series']}: {what}")

    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    reports = report.run(good, spec, jobs=args.jobs, predictions=bool(args.predictions_out), progress=progress)
    runtime = {"wall": round(time.perf_counter() - wall0, 2), "cpu": round(_cpu_seconds() - cpu0, 2)}
    if args.predictions_out:
        with open(args.predictions_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(report.PREDICTION_COLUMNS)
            for r in reports:
                w.writerows(r.pop("predictions", []))
    reports += bad
    doc = {"csv": args.csv if len(args.csv) > 1 else args.csv[0], "value_col": args.value_col, "freq": args.freq,
           "step_seconds": step_s,
           "season": spec.season, "horizon": spec.horizon, "level": spec.level, "models": list(spec.models),
           "origins": spec.origins, "runtime_s": runtime, "summary": report.summarize(reports), "series": reports}
    if args.output in ("json", "yaml"):
        from tools.meshctl.output import dump
        out(dump(doc, args.output))
        return 0
    out(_table(doc, wide=args.output == "wide"))
    return 0


def _table(doc: dict, wide: bool) -> str:
    from tools.meshctl.output import render_table
    models = [m for m in doc["models"] if m not in ("naive", "snaive")]
    rows = []
    for r in doc["series"]:
        if "error" in r:
            rows.append([r["series"], "-", "-"] + [""] * (5 + (len(models) if wide else 0)) + [r["error"]])
            continue
        m = r["models"]
        row = [r["series"], r["points"], r["chosen"], f"{m[r['chosen']]['mase']:.3f}", f"{m['naive']['mase']:.3f}",
               f"{m['snaive']['mase']:.3f}", f"{m[r['chosen']]['coverage']:.0%}", "yes" if r["beats_both"] else "no"]
        if wide:
            row += [f"{m[x]['mase']:.3f}" for x in models]
        rows.append(row + [""])
    headers = ["SERIES", "POINTS", "CHOSEN", "MASE", "NAIVE", "SNAIVE", "COVERAGE", "BEATS BOTH"]
    if wide:
        headers += [x.upper() for x in models]
    headers.append("ERROR")
    if not any("error" in r for r in doc["series"]):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    s = doc["summary"]
    text = render_table(headers, rows)
    if s.get("series"):
        text += (f"\n{s['series']} series, horizon {doc['horizon']}, season {doc['season']}: chosen beats the last "
                 f"value on {s['beats_naive_share']:.0%}, the seasonal naive on {s['beats_snaive_share']:.0%}, both on "
                 f"{s['beats_both_share']:.0%}; error vs the better naive {s['rel_mae_best_naive_median']:.3f} "
                 f"(median); {doc['level']:.0%} intervals cover {s['coverage']:.1%}\n")
    return text


def run_concurrency(args: argparse.Namespace) -> int:
    from mesh.errors import InvalidArgument
    try:
        return _concurrency(args)
    except InvalidArgument as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return 2


def _concurrency(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from mesh.errors import InvalidArgument
    from mesh.forecast.events import concurrency, level_at
    from mesh.forecast.series import read_csv
    weights = [w.strip() for w in args.weight_cols.split(",") if w.strip()]
    df = read_csv(args.csv, args.start_col, args.end_col)
    for w in weights:
        if w not in df.columns:
            raise InvalidArgument.of("weight-cols", f"no column {w!r} in {args.csv}", ", ".join(df.columns))
    cols = {}
    for flag, col in [("start-col", args.start_col), ("end-col", args.end_col)] + [("weight-cols", w) for w in weights]:
        v = pd.to_numeric(df[col].str.strip(), errors="coerce")
        if v.isna().any():
            row = int(np.flatnonzero(v.isna().to_numpy())[0])
            raise InvalidArgument.of(flag, f"{col!r} has a non-numeric value at row {row + 2}: {df[col].iloc[row]!r}")
        cols[col] = v.to_numpy(dtype=float)
    try:
        step = float(args.freq)
    except ValueError:
        try:
            step = pd.Timedelta(args.freq).total_seconds()
        except ValueError:
            raise InvalidArgument.of("freq", f"not seconds or a duration: {args.freq!r}") from None
    if step <= 0:
        raise InvalidArgument.of("freq", f"must be > 0, got {args.freq}")
    w = np.full(len(df), args.weight_scale)
    for c in weights:
        w = w * cols[c]
    try:
        t, v = concurrency(cols[args.start_col], cols[args.end_col], w, step)
    except ValueError as exc:
        raise InvalidArgument.of("csv", str(exc)) from None
    end = level_at(cols[args.start_col], cols[args.end_col], w, t + step)      # known when the bin closes
    lines = ["time,value,at_end"] + [f"{ti:.0f},{vi:.6g},{ei:.6g}" for ti, vi, ei in zip(t, v, end)]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        info(f"wrote {len(t)} bins to {args.out}")
    else:
        out(text)
    return 0
