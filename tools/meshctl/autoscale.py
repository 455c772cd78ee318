"""`meshctl autoscale DEPLOYMENT ...` (like `kubectl autoscale`), and the policies for `get policies` and
`describe deployment` (docs/autoscaling.md)."""

from __future__ import annotations

import argparse
import re

from tools.meshctl.common import CliError, client, info, out, subcommand

EPILOG = """\
examples:
  meshctl autoscale chat --min 1 --max 4 --metric concurrency --target 4
  meshctl autoscale chat --min 1 --max 8 --target 4 --panic-window 6s --stable-window 60s --scale-down-delay 2m
  meshctl autoscale chat --min 0 --max 4 --target 2 --scale-to-zero-after 5m   # the gateway wakes it
  meshctl autoscale chat --max 6 --target 4 --predictive --forecast-quantile 0.95
  meshctl autoscale chat --max 16 --target 0.7 --predictive --slo-ttft 6800 --forecast-quantile 0.75
      # sized for the objective's room to queue (Erlang C at q0.7), nowcast and catch-up on: what
      # `meshctl bench autoscale` measures
  meshctl autoscale chat --max 8 --target 0.7 --metric kv_cache --cost-ceiling 3.50
  meshctl autoscale chat --max 4 --metric ttft --target 800                     # TTFT objective, ms
  meshctl autoscale chat --delete                                               # remove the policy
  meshctl get policies                      # DEPLOYMENT MIN MAX METRIC TARGET REPLICAS DESIRED MODE ...
  meshctl get policies -o wide              # with the windows, cost and the last reason
  meshctl describe deployment chat          # the policy and the autoscaler's last decision

The leader's autoscaler samples the replicas' load every few seconds, averages it over the stable window
(and the panic window, for bursts), and sets the deployment's replicas between --min and --max; it never
exceeds --cost-ceiling dollars per hour and says so in a Warning event when the ceiling binds. Each change
is an event (meshctl get events --for deployment/NAME). While a policy is set, `meshctl scale` is
overridden on the autoscaler's next pass. Durations take s, m, h (6s, 2m, 1h) or plain seconds.
"""

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """`90`, `6s`, `2m`, `1h` -> seconds (any sign: the control plane says what is allowed)."""
    m = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h|d)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (6s, 2m, 1h, or seconds)")
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "autoscale", help="set a deployment's scaling policy (like kubectl autoscale)",
                   description="Set (or with --delete remove) the scaling policy of a deployment: the leader's "
                               "autoscaler then keeps its replicas between --min and --max.", epilog=EPILOG)
    p.add_argument("deployment", metavar="DEPLOYMENT")
    p.add_argument("--min", dest="min_replicas", type=int, default=None, metavar="N",
                   help="fewest replicas, 0-64 (default 1; 0 with --scale-to-zero-after)")
    p.add_argument("--max", dest="max_replicas", type=int, default=None, metavar="N", help="most replicas, 1-64")
    p.add_argument("--metric", default="concurrency",
                   help="concurrency (in flight per replica), queue (waiting), kv_cache (0-1), ttft (ms); "
                        "default concurrency")
    p.add_argument("--target", type=float, default=None, metavar="X", help="the value per replica to aim at")
    p.add_argument("--stable-window", type=duration, default=0.0, metavar="DUR", help="default 60s")
    p.add_argument("--panic-window", type=duration, default=0.0, metavar="DUR", help="default 6s")
    p.add_argument("--panic-threshold", type=float, default=0.0, metavar="X",
                   help="panic at X times the ready capacity (default 2)")
    p.add_argument("--scale-up-delay", type=duration, default=0.0, metavar="DUR", help="default 0s")
    p.add_argument("--scale-down-delay", type=duration, default=None, metavar="DUR", help="default 2m")
    p.add_argument("--max-scale-up-rate", type=float, default=0.0, metavar="X",
                   help="at most X times the ready replicas per step (default 10)")
    p.add_argument("--scale-to-zero-after", type=duration, default=0.0, metavar="DUR",
                   help="idle this long -> 0 replicas (needs --min 0, the default then)")
    p.add_argument("--predictive", action="store_true", help="add replicas ahead of the demand forecast")
    p.add_argument("--lead-time", type=duration, default=0.0, metavar="DUR",
                   help="how far ahead (default: the measured cold start)")
    p.add_argument("--forecast-quantile", type=float, default=0.0, metavar="Q", help="0.5 < Q < 1 (default 0.9)")
    p.add_argument("--slo-ttft", type=float, default=0.0, metavar="MS",
                   help="the time-to-first-token objective served, ms (a predictive policy sizes for its room to "
                        "queue; default: none, or a ttft policy's target)")
    p.add_argument("--sizing", default="", choices=("", "erlang", "poisson", "little"),
                   help="how the forecast rate becomes replicas (default: erlang with an objective, else little)")
    p.add_argument("--sizing-quantile", type=float, default=0.0, metavar="Q", help="0 < Q < 1 (default 0.7)")
    p.add_argument("--nowcast", choices=("on", "off"), default=None,
                   help="never below the rate so far in the minute under way (default on)")
    p.add_argument("--catch-up", choices=("on", "off"), default=None,
                   help="median floor and no scale-down delay when a cold start fits the room to queue (default on)")
    p.add_argument("--cost-ceiling", type=float, default=0.0, metavar="DOLLARS",
                   help="dollars per hour the deployment's replicas may never exceed together")
    p.add_argument("--variants", default="", metavar="V1,V2", help="variants in the order to add replicas of")
    p.add_argument("--delete", action="store_true", help="remove the policy (replicas stay where they are)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mesh import scalingpolicy
    with client(args) as mesh:
        if args.delete:
            d = mesh.clear_scaling(args.deployment)
            info(f"deployment/{args.deployment}: scaling policy removed ({d.spec.replicas} replicas)")
            return 0
        if args.max_replicas is None or args.target is None:
            raise CliError("--max and --target are required (or --delete)")
        policy = scalingpolicy.build(
            min_replicas=args.min_replicas, max_replicas=args.max_replicas, metric=args.metric, target=args.target,
            stable_window_s=args.stable_window, panic_window_s=args.panic_window,
            panic_threshold=args.panic_threshold, scale_up_delay_s=args.scale_up_delay,
            scale_down_delay_s=args.scale_down_delay, max_scale_up_rate=args.max_scale_up_rate,
            scale_to_zero_after_s=args.scale_to_zero_after, predictive=args.predictive,
            lead_time_s=args.lead_time, forecast_quantile=args.forecast_quantile,
            cost_ceiling_per_hour=args.cost_ceiling,
            variants=tuple(v for v in args.variants.split(",") if v), slo_ttft_ms=args.slo_ttft,
            sizing=args.sizing, sizing_quantile=args.sizing_quantile,
            nowcast=None if args.nowcast is None else args.nowcast == "on",
            catch_up=None if args.catch_up is None else args.catch_up == "on")
        d = mesh.set_scaling(args.deployment, policy)
    if args.output in ("json", "yaml"):
        from tools.meshctl.output import dump
        out(dump(scalingpolicy.policy_doc(d), args.output))
    else:
        from controlplane.serving.scalingspec import describe
        out(f"deployment/{args.deployment} autoscaled: {describe(d.spec.scaling)}\n")
    return 0


def _cost(doc: dict) -> str:
    a = doc["autoscaler"]
    c = doc["policy"]["cost_ceiling_per_hour"]
    now = f"${a['replica_cost_per_hour'] * doc['replicas']:.2f}/h" if a and a["replica_cost_per_hour"] else "-"
    return now + (f" of ${c:g}" if c else "")


def format_policies(items: list, fmt: str) -> str:
    """`meshctl get policies`: the deployments with a policy (gpumesh.v1.Deployment messages)."""
    from mesh.scalingpolicy import policy_doc
    from tools.meshctl.output import dump, render_table
    docs = [policy_doc(d) for d in items if d.spec.HasField("scaling")]
    if fmt in ("json", "yaml"):
        return dump({"items": docs}, fmt)
    if not docs:
        return "No scaling policies found (meshctl autoscale DEPLOYMENT --max N --target X sets one).\n"
    wide = fmt == "wide"
    headers = ["DEPLOYMENT", "MIN", "MAX", "METRIC", "TARGET", "REPLICAS", "READY", "DESIRED", "MODE", "BOUND-BY"]
    if wide:
        headers += ["WINDOWS", "DOWN-DELAY", "TO-ZERO", "PREDICTIVE", "COST", "REASON"]
    rows = []
    for doc in docs:
        p, a = doc["policy"], doc["autoscaler"] or {}
        row = [doc["deployment"], p["min_replicas"], p["max_replicas"], p["metric"], f"{p['target']:g}",
               doc["replicas"], doc["ready_replicas"], a.get("desired", "-"), a.get("mode") or "-",
               a.get("bound_by") or "-"]
        if wide:
            row += [f"{p['stable_window_seconds']:g}s/{p['panic_window_seconds']:g}s",
                    f"{p['scale_down_delay_seconds']:g}s",
                    f"{p['scale_to_zero_after_seconds']:g}s" if p["scale_to_zero_after_seconds"] else "-",
                    f"q{p['forecast_quantile']:g}" if p["predictive"] else "-", _cost(doc),
                    (a.get("reason") or "-")[:80]]
        rows.append(row)
    return render_table(headers, rows)


def format_section(d: dict) -> str:
    """The `Scaling:` section of `describe deployment` (from deployment_to_dict's "scaling")."""
    from tools.meshctl.describe import _fields, _indent
    s = d.get("scaling")
    if not s:
        return "Scaling:\n  <none> (meshctl autoscale sets a policy)\n"
    p, a = s["policy"], s["autoscaler"]
    pairs = [("Replicas", f"{p['min_replicas']}-{p['max_replicas']}"),
             ("Target", f"{p['metric']} {p['target']:g} per replica"),
             ("Windows", f"stable {p['stable_window_seconds']:g}s, panic {p['panic_window_seconds']:g}s "
                         f"(at {p['panic_threshold']:g}x)"),
             ("Scale up", f"delay {p['scale_up_delay_seconds']:g}s, at most {p['max_scale_up_rate']:g}x per step"),
             ("Scale down", f"delay {p['scale_down_delay_seconds']:g}s"),
             ("Scale to zero", f"after {p['scale_to_zero_after_seconds']:g}s idle"
              if p["scale_to_zero_after_seconds"] else "no"),
             ("Predictive", (f"quantile {p['forecast_quantile']:g}, lead "
                             f"{p['lead_time_seconds']:g}s" if p["lead_time_seconds"] else
                             f"quantile {p['forecast_quantile']:g}, lead = measured cold start")
              if p["predictive"] else "no"),
             ("TTFT objective", f"{p['slo_ttft_ms']:g} ms" if p.get("slo_ttft_ms") else "none"),
             ("Sizing", f"{p['sizing']}" + (f" q{p['sizing_quantile']:g}" if p["sizing"] != "little" else "")
              + f", nowcast {'on' if p['nowcast'] else 'off'}, catch-up {'on' if p['catch_up'] else 'off'}"
              if p["predictive"] and "sizing" in p else "-"),
             ("Cost ceiling", f"${p['cost_ceiling_per_hour']:g}/h" if p["cost_ceiling_per_hour"] else "none")]
    if a:
        pairs += [("Desired", f"{a['desired']} ({a['mode']}{', bound by ' + a['bound_by'] if a['bound_by'] else ''})"),
                  ("Reason", a["reason"]), ("Replica cost", f"${a['replica_cost_per_hour']:.4f}/h"),
                  ("Last scale", a["last_scale_at"] or "-"), ("Observed", a["observed_at"] or "-"),
                  ("Signals", " ".join(f"{k}={v:g}" for k, v in a["signals"].items()) or "-")]
        if a.get("woken_at"):
            pairs.append(("Woken", a["woken_at"]))
    return "Scaling:\n" + _indent(_fields(pairs))
