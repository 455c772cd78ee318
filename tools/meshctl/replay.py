"""`meshctl replay`: none, reactive and predictive controllers on the same trace arrivals.

A discrete-event simulation with a simulated clock (no gRPC, no etcd): the trace's pods arrive and
depart at their creation/deletion times inside a window, are placed by the control plane's scheduler
(the FGD profile, the code behind Allocate), and every slice takes --mig-create-s to carve unless a
warm slice of its shape is ready. Each controller runs the orchestrator's rules (mesh/orchestrator)
every --tick-s: reactive on the present readings, predictive on forecasts (mesh/forecast). Per-workload
memory load is a documented synthetic pattern unless --load gives a series (docs/prediction.md).
"""

from __future__ import annotations

import argparse
import os
import time

from tools.meshctl.common import CliError, info, out, positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl replay --controller none,reactive,predictive -o json
  meshctl replay --nodes gpu_node --arrivals gpushare100 --days 7 --seeds 3 --plot replay.png
  meshctl replay --mig-create-s 30 --mig-destroy-s 15 --controller reactive,predictive
  meshctl replay --arrivals gpushare40 --seeds 3 --first-seed 3        # seeds 3, 4, 5 (held out)
  meshctl replay --load genai_memory.csv --days 1        # a time_s,value CSV replayed per workload

--nodes and --arrivals take a trace file name (gpu_node; default, gpushare40, ...) under the trace
directory ($MESH_TRACE_DIR or ../shared/traces/alibaba-gpu-v2023) or a path (openb CSV columns:
name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,creation_time,deletion_time; name, num_gpu and
creation_time are required). The window is the --days before --end (default: the last arrival);
history before it feeds the forecasts. With -o json: {"window": {...}, "params": {...}, "seeds": [...],
"controllers": {"<name>": {"alloc_wait_p50_s", "alloc_wait_p99_s", "waited_allocations",
"critical_memory_gpu_minutes", "critical_foreseen_gpu_minutes", "critical_thermal_gpu_minutes",
"migrations", "migrations_per_workload_day", "warm_idle_gpu_hours", "warm_created", "warm_claimed",
"fleet_gpu_hours", "demand_forecast_mae", "pressure_forecast_mae", "pressure_interval_coverage",
"runtime_s": {"wall", "cpu"}, ...}}},
each figure the mean over seeds. Progress goes to stderr. Bad input (a missing file, a column missing or
not a number, an unknown controller, a bad flag) exits 2 naming it. Thermal state is not modelled:
critical_thermal_gpu_minutes is always 0. The protocol and figures: docs/prediction.md, "Replay".
"""

FIGURES = ("alloc_wait_p50_s", "alloc_wait_p99_s", "alloc_wait_mean_s", "waited_allocations",
           "critical_memory_gpu_minutes", "critical_foreseen_gpu_minutes", "critical_thermal_gpu_minutes",
           "migrations", "migrations_per_workload_day", "warm_idle_gpu_hours", "warm_created", "warm_claimed",
           "fleet_gpu_hours", "allocations",
           "unplaced", "demand_forecast_mae", "pressure_forecast_mae", "pressure_interval_coverage")


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "replay", help="compare none/reactive/predictive controllers on a trace replay",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--nodes", default="gpu_node", metavar="FILE", help="node list (default: gpu_node)")
    p.add_argument("--arrivals", default="default", metavar="FILE", help="pod list with times (default: default)")
    p.add_argument("--load", metavar="FILE", help="a time_s,value CSV of memory use (fraction of the allocation)")
    p.add_argument("--trace-dir", default="", metavar="DIR", help="where the openb_*.csv files are")
    p.add_argument("--controller", default="none,reactive,predictive", metavar="NAME[,NAME...]",
                   help="none, reactive, predictive (default: all three)")
    p.add_argument("--days", type=positive_float, default=2.0, metavar="D", help="window length (default: 2)")
    p.add_argument("--end", type=float, default=None, metavar="S",
                   help="window end, trace seconds (default: the last arrival)")
    p.add_argument("--mig-create-s", type=float, default=10.0, metavar="X",
                   help="seconds to carve a slice (default: 10, an assumption: see docs/prediction.md)")
    p.add_argument("--mig-destroy-s", type=float, default=5.0, metavar="Y", help="seconds to destroy one (default: 5)")
    p.add_argument("--tick-s", type=positive_float, default=60.0, metavar="S", help="control period (default: 60)")
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N", help="seeds 0..N-1 (default: 1)")
    p.add_argument("--first-seed", type=int, default=0, metavar="S",
                   help="seeds S..S+N-1 (default: 0); held-out seeds for figures the settings were not tuned on")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw per controller over time: allocation waits, GPUs at critical pressure, warm slices "
                        "held, migrations (the first seed; needs matplotlib: pip install .[sim])")
    p.set_defaults(func=run_replay)


def replay(args: argparse.Namespace) -> dict:
    from mesh.errors import InvalidArgument
    from tools.replay import controlled, load, trace
    ctls = [c.strip() for c in args.controller.split(",") if c.strip()]
    for c in ctls:
        if c not in controlled.CONTROLLERS:
            raise CliError(f"--controller: unknown controller {c!r}; allowed: {', '.join(controlled.CONTROLLERS)}")
    for flag, v in (("--mig-create-s", args.mig_create_s), ("--mig-destroy-s", args.mig_destroy_s)):
        if v < 0:
            raise CliError(f"{flag}: must be >= 0, got {v:g}")
    nodes_path = trace.trace_path(args.nodes, args.trace_dir, "node")
    pods_path = trace.trace_path(args.arrivals, args.trace_dir, "pod")
    for what, path in (("--nodes", nodes_path), ("--arrivals", pods_path)):
        if not os.path.exists(path):
            raise CliError(f"{what}: no trace file {path}")
    try:
        nodes, pods = trace.load_nodes(nodes_path), trace.load_pods(pods_path, require=("creation_time",))
    except trace.TraceError as e:
        raise CliError(str(e)) from None
    if not pods or not nodes:
        raise CliError("--arrivals/--nodes: the trace file has no rows")
    end = args.end if args.end is not None else max(p.creation_time for p in pods) + 1
    start = end - args.days * 86400
    try:
        series = load.read_series(args.load) if args.load else None
    except InvalidArgument as e:
        raise CliError(str(e)) from None
    params = controlled.Params(create_s=args.mig_create_s, destroy_s=args.mig_destroy_s, tick_s=args.tick_s)
    docs: dict[str, dict] = {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    timelines: dict[str, list[dict]] = {}
    for c in ctls:
        runs = []
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for seed in seeds:
            def progress(day, c=c, seed=seed):
                info(f"{c} seed {seed}: day {day} of {args.days:g} replayed")
            runs.append(controlled.simulate(nodes, pods, c, seed, start, end, params, series, progress))
            info(f"{c} seed {seed}: done ({runs[-1]['allocations']} allocations)")
        timelines[c] = runs[0].pop("timeline")
        for r in runs[1:]:
            r.pop("timeline")
        doc = {}
        for f in FIGURES:
            vals = [r[f] for r in runs if r[f] is not None]
            doc[f] = round(sum(vals) / len(vals), 4) if vals else None
        doc["cold_allocations"] = runs[0]["cold_allocations"]
        # what replaying this controller took, all seeds (wall clock, and this process's CPU time, which
        # a machine shared with other jobs slows less)
        doc["runtime_s"] = {"wall": round(time.perf_counter() - wall0, 2), "cpu": round(time.process_time() - cpu0, 2)}
        docs[c] = doc
    return {"window": {"start_s": start, "end_s": end, "days": args.days, "nodes": os.path.basename(nodes_path),
                       "arrivals": os.path.basename(pods_path), "load": args.load or "synthetic"},
            "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
            "seeds": list(seeds), "controllers": docs, "timelines": timelines}


def run_replay(args: argparse.Namespace) -> int:
    """Exit 2 on bad input (the message names the flag and the problem)."""
    import sys
    from tools.meshctl.output import dump, render_table
    from tools.replay import plot
    try:
        if args.plot:
            plot.check(args.plot)
        doc = replay(args)
    except CliError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    timelines = doc.pop("timelines")
    if args.plot:
        plot.draw(timelines, args.plot, title=f"{doc['window']['arrivals']}, {args.days:g} days, seed {args.first_seed}")
        info(f"wrote {args.plot}")
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
        return 0
    cols = ("alloc_wait_p50_s", "alloc_wait_p99_s", "critical_memory_gpu_minutes", "migrations",
            "migrations_per_workload_day", "warm_idle_gpu_hours", "fleet_gpu_hours")
    rows = [[name] + [d[c] for c in cols] for name, d in doc["controllers"].items()]
    out(render_table(["CONTROLLER", "WAIT P50 S", "WAIT P99 S", "CRIT MEM GPU-MIN", "MIGRATIONS", "MIG/WORKLOAD-DAY",
                      "WARM IDLE GPU-H", "FLEET GPU-H"], rows))
    return 0
