"""`meshctl forecast get|series`: forecasts from the control plane's ForecastService (docs/prediction.md)."""

from __future__ import annotations

import argparse
from datetime import datetime

from tools.meshctl.common import CliError, client, out, subcommand

KINDS = ("gpu", "slice", "node", "deployment", "tenant", "fleet")
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

A series is KIND/NAME METRIC as `meshctl forecast series` lists them. The forecast needs about eight
horizons of history (a rolling-origin backtest chooses the model); with less, the control plane says
how much it needs.
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
    g.add_argument("series", metavar="KIND/NAME", help="gpu/NODE/INDEX, deployment/NAME, tenant/NAME, fleet/NAME")
    g.add_argument("metric", help="memory_used, utilization, temperature, requests_running, requests, ...")
    g.add_argument("--horizon", type=duration, required=True, metavar="DURATION", help="how far ahead (30s, 30m, 2h)")
    g.add_argument("--step", type=duration, default=0.0, metavar="DURATION",
                   help="time between forecast points (default: about 30 points over the horizon)")
    g.add_argument("--level", type=float, default=0.0, metavar="P", help="interval coverage in (0, 1) (default 0.9)")
    g.set_defaults(func=run_get)
    s = subcommand(fsub, "series", help="list the series the control plane's history holds", epilog=SERIES_EPILOG)
    s.add_argument("--kind", default="", choices=("",) + KINDS, help="only series of this kind")
    s.set_defaults(func=run_series)


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
