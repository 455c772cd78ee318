"""`meshctl cost` (what the fleet's slices cost, grouped) and `meshctl recommend` (consolidation)."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, client, info, out, subcommand

COST_EPILOG = """\
examples:
  meshctl cost                                  # by tenant over the last 24 h
  meshctl cost --by model --since 7d            # $ per model, $/1k tokens
  meshctl cost --by deployment -o wide          # with idle and GPU-hours columns
  meshctl cost --by node --since 1h -o json

Prices are configuration (the control plane's gpu_prices, $ per GPU-hour per GPU model); a slice pays its
share of its GPU per second it exists. IDLE columns: idle warm slices and idle replicas (READY, no request).
"""
RECOMMEND_EPILOG = """\
examples:
  meshctl recommend                             # KIND TARGET ACTION SAVING/DAY RISK
  meshctl recommend -o json
  meshctl recommend --apply --kind resize       # admin: carry them out one at a time, stop at the first failure
  meshctl recommend --apply --limit 1
  meshctl recommend --slice s-7f3a9c1e2b4d       # only those about one slice (--apply: carry out those)
  meshctl recommend --apply --id 'pack:n1/0:s-1@w-1>n2/0'   # exactly this one (ids: -o json), if it still holds
  meshctl recommend -o wide                      # + REPLICA NODE TARGET

--apply carries out exactly the recommendations it lists, each named by its id: a pack moves each slice to the
GPU listed for it, an idle-replica removes the replica listed. One that no longer holds as listed (a pack whose
GPU holds other slices now, a receiving GPU without room, a resize to another size, an idle replica gone or its
deployment changed) is refused naming what changed, and nothing is carried out in its place. List again to see
what holds now.
"""
BY = ("tenant", "model", "deployment", "node", "slice")
KINDS = ("resize", "idle-replica", "idle-warm", "share-mps", "pack")


def duration(text: str) -> float:
    from mesh.config import ConfigError
    from controlplane.forecast.history import parse_duration
    try:
        return parse_duration(text, "--since")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--since: ")) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "cost", help="what the fleet's slices cost, by tenant, model, deployment or node",
                   epilog=COST_EPILOG)
    p.add_argument("--by", default="tenant", help=f"{' | '.join(BY)} (default tenant)")
    p.add_argument("--since", type=duration, default=86400.0, metavar="DURATION", help="30m, 24h, 7d (default 24h)")
    p.set_defaults(func=run_cost)
    r = subcommand(sub, "recommend", help="consolidation: smaller slices, idle replicas and warm slices, packing",
                   epilog=RECOMMEND_EPILOG)
    r.add_argument("--apply", action="store_true", help="carry them out (admin), one at a time")
    r.add_argument("--kind", action="append", default=[], choices=KINDS, help="only this kind (repeatable)")
    r.add_argument("--limit", type=int, default=0, metavar="N", help="apply at most N (default all)")
    r.add_argument("--slice", default="", metavar="ID", help="only the recommendations about this slice")
    r.add_argument("--id", action="append", default=[], metavar="ID",
                   help="only this recommendation (its id in -o json; repeatable), if it still holds as listed")
    r.add_argument("--apply-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long --apply may take in all (default 1800)")
    r.set_defaults(func=run_recommend)


def _duration_text(seconds: float) -> str:
    """`--since`'s seconds as the operator wrote them (86400000 -> 1000d)."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def _money(x: float) -> str:
    return f"${x:,.4f}" if abs(x) < 1 else f"${x:,.2f}"


def run_cost(args: argparse.Namespace) -> int:
    if args.by not in BY:
        raise CliError(f"--by: {args.by!r} is not one of {', '.join(BY)}")
    from mesh import errors
    from mesh.costapi import to_dict
    from tools.meshctl.output import dump, render_table
    with client(args) as mesh:
        try:
            resp = mesh.get_cost(by=args.by, since_seconds=args.since)
        except errors.InvalidArgument as e:
            if e.field != "since_seconds":
                raise
            if "cost_retention_days" not in e.allowed:     # more lines than one answer holds
                raise CliError(f"--since {_duration_text(args.since)} --by {args.by}: more lines than one answer "
                               f"holds; narrow it: {e.allowed.replace('`by`', '--by')}") from None
            raise CliError(f"--since: {_duration_text(args.since)} is more than the control plane keeps costs for "
                           f"(allowed: {e.allowed or 'a shorter window'})") from None
    if args.output in ("json", "yaml"):
        out(dump(to_dict(resp), args.output))
        return 0
    wide = args.output == "wide"
    headers = [args.by.upper(), "COST", "$/HOUR NOW", "IDLE WARM", "IDLE REPLICA", "$/1K TOKENS"]
    if wide:
        headers += ["SLICE-HOURS", "GPU-HOURS", "TOKENS"]
    rows = []
    for ln in list(resp.lines) + [resp.total]:
        row = [ln.key or "-", _money(ln.dollars), _money(ln.dollars_per_hour), _money(ln.idle_warm_dollars),
               _money(ln.idle_replica_dollars), _money(ln.dollars_per_1k_tokens) if ln.tokens else "-"]
        if wide:
            row += [f"{ln.slice_seconds / 3600:.3f}", f"{ln.gpu_seconds / 3600:.3f}", f"{ln.tokens:g}"]
        rows.append(row)
    out(render_table(headers, rows))
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    from mesh.costapi import to_dict
    from tools.meshctl.output import dump, render_table
    if args.limit < 0:
        raise CliError(f"--limit: {args.limit} is negative (0: all)")
    with client(args) as mesh:
        resp = mesh.recommend(kinds=args.kind, slice_id=args.slice, ids=args.id)
        if args.apply:
            resp = _apply(mesh, args, resp)
    if args.output in ("json", "yaml"):
        out(dump(to_dict(resp), args.output))
        return 1 if resp.stopped else 0
    wide = args.output == "wide"
    headers = (["KIND", "DEPLOYMENT", "SLICE", "ACTION", "SAVING/DAY", "RISK"] + (["RESULT"] if args.apply else [])
               + (["REPLICA", "NODE", "TARGET"] if wide else []))
    rows = [[r.kind, r.deployment or "-", r.slice_id or r.node or "-", r.action, _money(r.saving_per_day), r.risk]
            + ([r.result or "-"] if args.apply else []) + ([r.replica or "-", r.node or "-", r.target or "-"]
                                                              if wide else []) for r in resp.recommendations]
    out(render_table(headers, rows) if rows else "No recommendations: nothing measured would cost less.\n")
    out(f"total saving per day: {_money(resp.saving_per_day)}" +
        (f"; applied {resp.applied}{' (stopped at a failure)' if resp.stopped else ''}" if args.apply else "") + "\n")
    return 1 if resp.stopped else 0


def _apply(mesh, args: argparse.Namespace, listed):
    """Carry out exactly the listed recommendations, one at a time (each named by its id), with a progress line
    per step on stderr, stopping at the first failure. One that no longer holds as listed is refused by the
    control plane (FAILED_PRECONDITION naming what changed): nothing is carried out in its place."""
    import time

    from mesh import errors
    recs = list(listed.recommendations)
    todo = recs[:args.limit] if args.limit else recs
    deadline = time.monotonic() + args.apply_timeout
    for i, r in enumerate(todo, 1):
        left = deadline - time.monotonic()
        if left <= 0:
            r.result = "skipped: --apply-timeout reached"
            listed.stopped = True
            break
        info(f"[{i}/{len(todo)}] {r.kind} {r.deployment or r.slice_id or r.node}: {r.action} ...")
        if not r.id:        # a control plane from before ids: it would apply the first pack it computes then
            if r.kind == "pack":
                r.result = "skipped: the control plane cannot apply exactly this pack (upgrade it)"
                info(f"[{i}/{len(todo)}] {r.result}")
                continue
            step = {"kinds": [r.kind], "slice_id": r.slice_id, "limit": 1}
        else:
            step = {"ids": [r.id]}
        try:
            got = mesh.recommend(apply=True, timeout=left, **step)
        except errors.FailedPrecondition as e:
            got = None
            r.result = f"failed: {e}"
            listed.stopped = True
        if got is not None:
            mine = next((x for x in got.recommendations if x.result), None)
            r.result = mine.result if mine is not None else "skipped: no longer recommended"
            listed.stopped = listed.stopped or got.stopped
        info(f"[{i}/{len(todo)}] {r.result}")
        if r.result == "applied":
            listed.applied += 1
        if listed.stopped:
            break
    return listed
