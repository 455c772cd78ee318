"""`meshctl get events` (kubectl's shape: TYPE, REASON, OBJECT, MESSAGE, COUNT, AGE; `-w` to follow) and
the "Events:" section `meshctl describe` prints for an object."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from typing import Any

from tools.meshctl.common import CliError, out

KINDS = {"node": "Node", "no": "Node", "nodes": "Node", "gpu": "Gpu", "gpus": "Gpu",
         "slice": "Slice", "sl": "Slice", "slices": "Slice", "allocation": "Allocation", "alloc": "Allocation",
         "workload": "Workload", "wl": "Workload", "migration": "Migration", "mig": "Migration",
         "deployment": "Deployment", "deploy": "Deployment", "deployments": "Deployment",
         "replica": "Replica", "orchestrator": "Orchestrator", "orch": "Orchestrator", "pool": "Pool",
         "pools": "Pool"}
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_for(text: str) -> tuple[str, str]:
    """`KIND/NAME` or `KIND` -> (Kind, name). A GPU's name has a slash itself: gpu/NODE/INDEX."""
    kind, _, name = text.partition("/")
    canon = KINDS.get(kind.lower())
    if canon is None:
        if kind[:1].isupper() and kind.isalnum():
            canon = kind                            # a later controller's own kind
        else:
            raise CliError(f"--for: unknown kind {kind!r} (allowed: {', '.join(sorted(set(KINDS.values())))}, "
                           f"as KIND/NAME)")
    return canon, name


def parse_since(text: str | None) -> float | None:
    """`--since 10m` -> seconds since the epoch (s, m, h, d)."""
    if not text:
        return None
    m = DURATION.match(text.strip())
    if not m:
        raise CliError(f"--since: {text!r} is not a duration (e.g. 30s, 10m, 2h, 1d)")
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return datetime.now(timezone.utc).timestamp() - float(m.group(1)) * mult


def _row(d: dict, now: datetime | None, wide: bool) -> list:
    from tools.meshctl.output import age
    row = [d["type"], d["reason"], f"{d['kind'].lower()}/{d['name']}", d["message"], d["count"],
           age(d["last_timestamp"], now)]
    if wide:
        row += [age(d["first_timestamp"], now), d["source"], d["node"] or "-", d["tenant"] or "-"]
    return row


HEADERS = ["TYPE", "REASON", "OBJECT", "MESSAGE", "COUNT", "AGE"]
WIDE = ["FIRST SEEN", "SOURCE", "NODE", "TENANT"]


def format_events(events: list, fmt: str, now: datetime | None = None) -> str:
    from mesh.eventapi import event_to_dict
    from tools.meshctl.output import dump, render_table
    docs = [event_to_dict(ev) for ev in events]
    if fmt in ("json", "yaml"):
        return dump({"items": docs}, fmt)
    if not docs:
        return "No events found.\n"
    wide = fmt == "wide"
    return render_table(HEADERS + (WIDE if wide else []), [_row(d, now, wide) for d in docs])


def section(events: list, now: datetime | None = None) -> str:
    """kubectl describe's "Events:" block: TYPE, REASON, AGE, FROM, MESSAGE (with xN when repeated)."""
    from mesh.eventapi import event_to_dict
    from tools.meshctl.output import age, render_table
    if not events:
        return "Events:  <none>\n"
    rows = []
    for ev in events:
        d = event_to_dict(ev)
        when = age(d["last_timestamp"], now) + (f" (x{d['count']} over {age(d['first_timestamp'], now)})"
                                                if d["count"] > 1 else "")
        rows.append([d["type"], d["reason"], when, d["source"], d["message"]])
    table = render_table(["TYPE", "REASON", "AGE", "FROM", "MESSAGE"], rows)
    return "Events:\n" + "".join("  " + line + "\n" for line in table.rstrip("\n").split("\n"))


def recent(mesh: Any, kind: str, name: str = "", node: str = "", limit: int = 20) -> list:
    """The newest `limit` events of one object (or of every object of `kind` on `node`)."""
    return mesh.list_events(kind=kind, name=name, node=node, limit=limit)


def run(args: argparse.Namespace, mesh: Any) -> int:
    kind, name = parse_for(args.for_) if args.for_ else ("", "")
    if args.names:
        if len(args.names) > 1 or name:
            raise CliError("get events takes one event object as --for KIND/NAME, or one NAME")
        name = args.names[0]
    etype = (args.type or "").capitalize()
    if etype and etype not in ("Normal", "Warning"):
        raise CliError(f"--type: {args.type!r} is not allowed (Normal, Warning)")
    since = parse_since(args.since)
    if args.watch and getattr(args, "limit", 0):
        raise CliError("--limit applies to the list, not to -w/--watch (use --since to start later)")
    flt = dict(kind=kind, name=name, type=etype, since=since, tenant=args.tenant, node=args.node,
               reason=getattr(args, "reason", ""))
    if not args.watch:
        out(format_events(mesh.list_events(**flt, limit=getattr(args, "limit", 0)), args.output))
        return 0
    return watch(mesh, flt, args.output)


def watch(mesh: Any, flt: dict, fmt: str) -> int:
    """Print the matching events, then each new one or repeat as it is recorded, until interrupted."""
    from mesh.eventapi import NOTICE_NAMES, event_to_dict
    from tools.meshctl.output import dump, render_table
    header_done = False
    wide = fmt == "wide"
    try:
        for notice in mesh.watch_events(send_initial=True, **flt):
            kind = NOTICE_NAMES.get(notice.type, "")
            if kind == "SYNCED" or (kind == "DELETED" and fmt in ("table", "wide")):
                continue
            d = event_to_dict(notice.event)
            if fmt == "json":
                out(json.dumps({"type": kind, "event": d}) + "\n")
            elif fmt == "yaml":
                out("---\n" + dump({"type": kind, "event": d}, "yaml"))
            else:
                table = render_table(HEADERS + (WIDE if wide else []), [_row(d, None, wide)])
                lines = table.split("\n")
                # kubectl -w: the header once; column widths follow each row (no realignment)
                out(("" if header_done else lines[0] + "\n") + lines[1] + "\n")
                header_done = True
    except KeyboardInterrupt:
        pass
    return 0
