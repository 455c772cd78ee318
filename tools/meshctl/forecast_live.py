"""`meshctl forecast get|series`: forecasts from the control plane's ForecastService (docs/prediction.md)."""

from __future__ import annotations

import argparse
from datetime import datetime

from tools.meshctl.common import CliError, client, out, subcommand

KINDS = ("gpu", "slice", "node", "workload", "deployment", "tenant", "fleet")
BARS = "▁▂▃▄▅▆▇█"
UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

GET_EPILOG = """\
examples:
  # GPU 0 of node-1: memory used over the next 30 minutes, with a 90% interval
  meshctl forecast get gpu/node-1/0 memory_used --horizon 30m
  # a deployment's running requests, 10 minutes ahead at 30 s steps, as JSON
  meshctl forecast get deployment/chat requests_running --horizon 10m --step 30s -o json
  # Allocate requests per minute across the fleet, 2 hours ahead, 80% interval
  meshctl forecast get fleet/allocate requests --horizon 2h --step 1m --level 0.8
  # a slice's memory used, a node's power, a workload's utilization
  meshctl forecast get slice/s-7f3a9c1e2b4d memory_used --horizon 10m
  meshctl forecast get node/node-1 power --horizon 30m
  meshctl forecast get workload/w-3f9a2c1d7e6b utilization --horizon 5m

A series is KIND/NAME METRIC as `meshctl forecast series` lists them. The forecast needs about eight
horizons of history (a rolling-origin backtest chooses the model); with less, the control plane says
how much it needs.
"""

INTERACTIONS_EPILOG = """\
examples:
  # every workload's entry: app type, phase, GPU model, MIG profile or MPS share, state
  meshctl forecast interactions
  # the training workloads, with their use over time, as JSON
  meshctl forecast interactions --app-type training -o json
  # one workload, up to 1000 use samples
  meshctl forecast interactions --workload w-3f9a2c1d7e6b --max-samples 1000 -o yaml

Seed 000's interaction log: per workload the labels its client gave (`app-type` and `phase` are the
application context), the hardware fingerprint (GPU model and memory, driver and CUDA version, MIG profile
or MPS share) and its resource use over time (utilization, memory used), kept as long as the history.
"""

SERIES_EPILOG = """\
examples:
  meshctl forecast series
  meshctl forecast series --kind gpu -o json
"""


def duration(text: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `1d` -> seconds."""
    t = text.strip()
    for unit in sorted(UNITS, key=len, reverse=True):
        if t.endswith(unit):
            num, mult = t[:-len(unit)], UNITS[unit]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (90s, 30m, 2h, 1d)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def sparkline(values: list[float], lo: float | None = None, hi: float | None = None) -> str:
    if not values:
        return ""
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    if hi <= lo:
        return BARS[0] * len(values)
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / (hi - lo) * len(BARS)))] for v in values)


def parse_series(text: str) -> tuple[str, str]:
    kind, _, name = text.partition("/")
    if kind not in KINDS or not name:
        raise CliError(f"series {text!r}: expected KIND/NAME with KIND one of {', '.join(KINDS)} "
                       f"(e.g. gpu/node-1/0, deployment/chat, fleet/allocate)")
    return kind, name


def register(fsub) -> None:
    g = subcommand(fsub, "get", help="forecast one series of the control plane's history", epilog=GET_EPILOG)
    g.add_argument("series", metavar="KIND/NAME", help="gpu/NODE/INDEX, slice/ID, node/NAME, workload/ID, "
                                                       "deployment/NAME, tenant/NAME, fleet/NAME")
    g.add_argument("metric", help="memory_used, utilization, temperature, requests_running, requests, ...")
    g.add_argument("--horizon", type=duration, required=True, metavar="DURATION", help="how far ahead (30s, 30m, 2h)")
    g.add_argument("--step", type=duration, default=0.0, metavar="DURATION",
                   help="time between forecast points (default: about 30 points over the horizon)")
    g.add_argument("--level", type=float, default=0.0, metavar="P", help="interval coverage in (0, 1) (default 0.9)")
    g.set_defaults(func=run_get)
    s = subcommand(fsub, "series", help="list the series the control plane's history holds", epilog=SERIES_EPILOG)
    s.add_argument("--kind", default="", choices=("",) + KINDS, help="only series of this kind")
    s.set_defaults(func=run_series)
    i = subcommand(fsub, "interactions", help="seed 000's interaction log: per workload its labels, hardware and use",
                   epilog=INTERACTIONS_EPILOG)
    i.add_argument("--app-type", default="", metavar="T", help="only workloads labelled app-type=T")
    i.add_argument("--workload", default="", metavar="ID", help="only this workload")
    i.add_argument("--tenant", default="", metavar="T", help="only this tenant's workloads")
    i.add_argument("--limit", type=int, default=0, metavar="N", help="entries at most (default 100, at most 1000)")
    i.add_argument("--max-samples", type=int, default=0, metavar="N",
                   help="use samples per entry at most (default 120)")
    i.set_defaults(func=run_interactions)


def format_forecast(f, fmt: str) -> str:
    from mesh.forecastapi import forecast_to_dict
    from tools.meshctl.output import dump, render_table
    d = forecast_to_dict(f)
    if fmt in ("json", "yaml"):
        return dump(d, fmt)
    pts = d["points"]
    lo = min([p["lo"] for p in pts] + [d["history"]["last_value"]])
    hi = max([p["hi"] for p in pts] + [d["history"]["last_value"]])
    h = d["history"]
    head = (f"{d['kind']}/{d['name']} {d['metric']}: model {d['model']} (backtest MASE {d['backtest_mase']:.3g}), "
            f"{int(d['level'] * 100)}% interval, fitted on {h['points']} points of {d['step_seconds']:g}s "
            f"({h['span_seconds']:g}s, last value {_number(d['metric'])(h['last_value'])})\n"
            f"forecast {sparkline([p['value'] for p in pts], lo, hi)}\n"
            f"high     {sparkline([p['hi'] for p in pts], lo, hi)}\n"
            f"low      {sparkline([p['lo'] for p in pts], lo, hi)}\n\n")
    rows = pts if fmt == "wide" or len(pts) <= 12 else pts[::max(1, len(pts) // 12)] + [pts[-1]]
    num = _number(d["metric"])
    seen, table_rows = set(), []
    for p in rows:
        if p["at"] in seen:
            continue
        seen.add(p["at"])
        table_rows.append([_clock(p["at"], d["step_seconds"]), num(p["value"]), num(p["lo"]), num(p["hi"])])
    return head + render_table(["TIME", "FORECAST", "LOW", "HIGH"], table_rows)


def _number(metric: str):
    """Bytes metrics in GiB, everything else as a short number."""
    if metric in ("memory_used", "memory_total"):
        return lambda v: f"{v / 2**30:.2f}Gi"
    return lambda v: f"{v:.4g}"


def _clock(rfc3339: str | None, step: float = 1.0) -> str:
    if not rfc3339:
        return "-"
    t = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return t.strftime("%Y-%m-%d %H:%M:%S") + (f".{t.microsecond // 1000:03d}" if step < 1 else "")


def run_get(args: argparse.Namespace) -> int:
    kind, name = parse_series(args.series)
    with client(args) as mesh:
        f = mesh.get_forecast(kind, name, args.metric, args.horizon, step_seconds=args.step, level=args.level)
    out(format_forecast(f, args.output))
    return 0


def run_series(args: argparse.Namespace) -> int:
    from mesh.forecastapi import series_to_dict
    from tools.meshctl.output import age, dump, render_table
    with client(args) as mesh:
        docs = [series_to_dict(s) for s in mesh.list_series(args.kind)]
    if args.output in ("json", "yaml"):
        out(dump({"items": docs}, args.output))
    elif not docs:
        out("No series found.\n")
    else:
        out(render_table(["SERIES", "METRIC", "TENANT", "SAMPLES", "FIRST", "LAST"],
                         [[f"{d['kind']}/{d['name']}", d["metric"], d["tenant"] or "-", d["samples"], age(d["first"]),
                           age(d["last"])] for d in docs]))
    return 0


def run_interactions(args: argparse.Namespace) -> int:
    from mesh.forecastapi import interaction_to_dict
    from tools.meshctl.output import age, dump, render_table
    with client(args) as mesh:
        docs = [interaction_to_dict(e) for e in mesh.list_interactions(
            args.app_type, workload_id=args.workload, tenant=args.tenant, limit=args.limit,
            max_samples=args.max_samples)]
    if args.output in ("json", "yaml"):
        out(dump({"items": docs}, args.output))
        return 0
    if not docs:
        out("No interactions found.\n")
        return 0
    rows = []
    for d in docs:
        hw = d["hardware"]
        share = hw["mig_profile"] or (f"mps {hw['mps_share']:.2f}" if hw["mps_share"] else hw["isolation"] or "-")
        mems = [u["memory_used_bytes"] for u in d["usage"] if u["memory_used_bytes"] is not None]
        utils = [u["utilization_pct"] for u in d["usage"] if u["utilization_pct"] is not None]
        row = [d["workload_id"], d["tenant"], d["app_type"] or "-", d["phase"] or "-", hw["gpu_model"] or "-", share,
               d["state"], age(d["started"]), f"{max(mems) / 2**30:.2f}Gi" if mems else "-",
               f"{sum(utils) / len(utils):.0f}%" if utils else "-"]
        if args.output == "wide":
            row += [hw["driver_version"] or "-", hw["cuda_version"] or "-", hw["node"] or "-", len(d["usage"])]
        rows.append(row)
    headers = ["WORKLOAD", "TENANT", "APP TYPE", "PHASE", "GPU", "SHARE", "STATE", "STARTED", "PEAK MEM", "MEAN UTIL"]
    if args.output == "wide":
        headers += ["DRIVER", "CUDA", "NODE", "SAMPLES"]
    out(render_table(headers, rows))
    return 0
