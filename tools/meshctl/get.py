"""`meshctl get RESOURCE [NAME...]`: list resources as a table (-o wide: more columns), or json/yaml
`{"items": [...]}`; `-w` follows slices, a deployment, a migration or events."""

from __future__ import annotations

import argparse
import sys

from tools.meshctl.common import CliError, client, key_value, nonneg_int, out, subcommand

# resource name -> canonical kind
RESOURCES = {
    "nodes": "nodes", "node": "nodes", "no": "nodes",
    "gpus": "gpus", "gpu": "gpus",
    "slices": "slices", "slice": "slices", "sl": "slices",
    "workloads": "workloads", "workload": "workloads", "wl": "workloads",
    "migrations": "migrations", "migration": "migrations", "mig": "migrations",
    "checkpoints": "checkpoints", "checkpoint": "checkpoints", "ck": "checkpoints",
    "models": "models", "model": "models",
    "deployments": "deployments", "deployment": "deployments", "deploy": "deployments",
    "replicas": "replicas", "replica": "replicas",
    "events": "events", "event": "events", "ev": "events",
    "policies": "policies", "policy": "policies", "hpa": "policies", "scalingpolicies": "policies",
    "pools": "pools", "pool": "pools",
    "connections": "connections", "connection": "connections", "conn": "connections",
    "grants": "grants", "grant": "grants",
    "servingview": "servingview", "view": "servingview", "sv": "servingview",
}

EPILOG = """\
resources: nodes (node, no), gpus (gpu), slices (slice, sl), workloads (workload, wl),
           migrations (migration, mig), checkpoints (checkpoint, ck), models (model),
           deployments (deployment, deploy), replicas (replica: NAMEs are deployments),
           events (event, ev: what the control plane did and why),
           policies (policy, hpa: deployments' scaling policies and the autoscaler's last decision),
           pools (pool: resource pools with their usage),
           connections (connection, conn: mesh connections, as `meshctl mesh get`),
           grants (grant: which tenants' slices may connect to which, as `meshctl mesh grants`),
           servingview (view, sv: what the gateway routes by, one row per replica; NAMEs are
           deployments; -o json|yaml: the whole snapshot, replica keys redacted)

examples:
  meshctl get nodes
  meshctl get nodes --state not-ready -o wide
  meshctl get gpus --node sim-node-01
  meshctl get slices --tenant team-a --state ready
  meshctl get sl s-7f3a9c1e2b4d -o yaml
  meshctl get workloads --slice s-7f3a9c1e2b4d
  meshctl get events                                  # TYPE REASON OBJECT MESSAGE COUNT AGE
  meshctl get events --for node/sim-node-01 --since 1h
  meshctl get events --type warning -w                # follow new events (Ctrl-C to stop)
  meshctl get events --for slice/s-7f3a9c1e2b4d -o yaml
  meshctl get events --for orchestrator               # the live orchestrator's warm-pool decisions
  meshctl get events --reason Preempted --limit 20    # the newest 20 of one reason
  meshctl get policies -o wide                        # MIN MAX METRIC TARGET DESIRED MODE BOUND-BY ...
  meshctl get slices -w                               # the slices, then a line per change (Ctrl-C to stop)
  meshctl get deployment chat -w -o json              # a JSON line per change of one deployment
  meshctl get migration m-1a2b3c4d5e6f -w
  meshctl get deployments --model smollm2-135m -l team=search
  meshctl get models --family llama -l tier=prod
  meshctl get migrations -o wide                      # + MODE TENANT ROUND SENT MB/S DOWNTIME TOTAL ...
  meshctl get connections --tenant team-a
  meshctl get grants
  meshctl get servingview -o wide                     # + NODE GPU "GPU HEALTH" MEMORY THERMAL KEY
  meshctl get sv chat -w                              # a fresh view of deployment chat whenever it changes
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "get", help="list resources: nodes, gpus, slices, workloads, deployments, models, events, ...",
                   description="List resources of one kind (see below). Names or IDs narrow the list.",
                   epilog=EPILOG)
    p.add_argument("resource", metavar="RESOURCE", help="nodes | gpus | slices | workloads | migrations | checkpoints "
                   "| models | deployments | replicas | events | policies | pools | connections | grants | servingview "
                   "(or an alias)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these names or IDs (nodes: node names; gpus: their node's names; slices: slice or "
                        "allocation IDs; deployments, models, pools: names; servingview: deployment names; "
                        "migrations, checkpoints: IDs or workload IDs)")
    p.add_argument("--tenant", default="", help="slices, workloads, deployments, migrations, checkpoints, "
                   "connections or events of this tenant only")
    p.add_argument("--node", default="", help="GPUs, slices, workloads or events on this node only")
    p.add_argument("--slice", default="", metavar="ID", help="workloads or connections of this slice only")
    p.add_argument("--state", default=None,
                   help="nodes: ready | not-ready; slices: pending | ready | releasing | failed | unknown")
    p.add_argument("--model", default="", help="deployments of this model only")
    p.add_argument("--family", default="", help="models of this family only")
    p.add_argument("-l", "--selector", type=key_value("label"), action="append", default=[], metavar="KEY=VALUE",
                   help="nodes, slices, workloads, deployments or models with this label (repeatable: all "
                        "must match)")
    p.add_argument("--for", dest="for_", default="", metavar="KIND/NAME",
                   help="events: only those of this object (node/NAME, slice/ID, deployment/NAME, migration/ID, "
                        "allocation/ID, workload/ID, pool/NAME, gpu/NODE/INDEX) or kind (node)")
    p.add_argument("--type", default="", help="events: Normal or Warning only")
    p.add_argument("--reason", default="", help="events: only this reason (Scaled, Preempted, NodeNotReady, ...)")
    p.add_argument("--limit", type=nonneg_int, default=0, metavar="N", help="events: the newest N only (0: all)")
    p.add_argument("--since", default=None, metavar="DURATION",
                   help="events: only those seen in the last 30s, 10m, 2h, 1d")
    p.add_argument("-w", "--watch", action="store_true",
                   help="events, slices, one deployment or one migration: after the list, a line per change; "
                        "servingview: a fresh view per change (Ctrl-C to stop)")
    p.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                   help="servingview -w: how often the control plane compares the view for a change, 0.1-60 "
                        "(default 0.5)")
    p.set_defaults(func=run)


# which kinds take which filters: anything else is refused, naming the flag and the kinds it filters, never
# silently ignored (`get replicas --node n1` listing every node's replicas reads as an answer; it is not one)
FILTERS = {"tenant": ("slices", "workloads", "deployments", "replicas", "policies", "migrations", "checkpoints",
                      "connections", "events"),
           "node": ("gpus", "slices", "workloads", "events"), "slice": ("workloads", "connections"),
           "state": ("nodes", "slices"),
           "model": ("deployments", "replicas"), "family": ("models",),
           "selector": ("deployments", "replicas", "models", "nodes", "slices", "workloads"),
           "reason": ("events",), "limit": ("events",), "for_": ("events",), "type": ("events",),
           "since": ("events",), "watch": ("events", "slices", "deployments", "migrations", "servingview"),
           "interval": ("servingview",)}
FLAG_NAMES = {"for_": "--for", "selector": "-l/--selector"}

# the kinds whose NAMEs name objects (for replicas and policies: deployments); a NAME none of them has is an
# error, as `kubectl get` answers NotFound (the ones found are still printed; exit status 1)
NAMED = {"nodes": "node", "slices": "slice or allocation", "workloads": "workload", "models": "model",
         "deployments": "deployment", "replicas": "deployment", "policies": "deployment", "pools": "pool",
         "connections": "mesh connection"}


def check_filters(args: argparse.Namespace, kind: str) -> None:
    for dest, kinds in FILTERS.items():
        if getattr(args, dest, None) and kind not in kinds:
            flag = FLAG_NAMES.get(dest, "--" + dest)
            raise CliError(f"{flag} applies to {', '.join(kinds)}, not {kind}")
    if args.watch and kind in ("deployments", "migrations") and len(args.names) != 1:
        raise CliError(f"-w/--watch on {kind} follows one: give one NAME (get {kind[:-1]} NAME -w)")


def has_labels(labels, selector) -> bool:
    """Whether a label map holds every KEY=VALUE pair of -l/--selector."""
    return all(labels.get(k) == v for k, v in selector)


def fetch(args: argparse.Namespace, kind: str) -> list:
    with client(args) as mesh:
        if kind == "nodes":
            items = mesh.list_nodes(state=args.state)
            return [n for n in items if (not args.names or n.name in args.names)
                    and has_labels(n.inventory.labels, args.selector)]
        if kind == "gpus":
            items = mesh.list_gpus(node=args.node)
            return [g for g in items if not args.names or g.node in args.names]
        items = mesh.list_slices(tenant=args.tenant, node=args.node, state=args.state)
        return [s for s in items
                if (not args.names or s.id in args.names or s.allocation_id in args.names)
                and has_labels(s.labels, args.selector)]


def run(args: argparse.Namespace) -> int:
    kind = RESOURCES.get(args.resource.lower())
    if kind is None:
        raise CliError(f"unknown resource {args.resource!r} (allowed: {', '.join(RESOURCES)})")
    if kind == "servingview":
        for flag, value in (("--tenant", args.tenant), ("--node", args.node), ("--slice", args.slice),
                            ("--state", args.state)):
            if value:
                raise CliError(f"{flag} does not filter servingview (the control plane scopes the view to the "
                               f"caller's tenant; NAMEs narrow it to deployments)")
    check_filters(args, kind)
    if kind == "servingview":
        from tools.meshctl import servingview
        interval_ms = servingview.interval_ms(args.interval, args.watch)
        with client(args) as mesh:
            return servingview.run(mesh, args.names, args.output, args.watch, interval_ms)
    if kind == "events":
        from tools.meshctl import events
        with client(args) as mesh:
            return events.run(args, mesh)
    if args.watch:
        from tools.meshctl import watch
        with client(args) as mesh:
            if kind == "slices":
                return watch.watch_slices(mesh, args)
            if kind == "deployments":
                return watch.watch_deployment(mesh, args.names[0], args.output)
            return watch.watch_migration(mesh, args.names[0], args.output)
    text, found = listing(args, kind)
    out(text)
    return missing_names(kind, args.names, found)


def missing_names(kind: str, names: list[str], found: set[str]) -> int:
    """Say which NAMEs of a named kind matched nothing (stderr) and answer the exit status: 1 if any did."""
    missing = [n for n in dict.fromkeys(names) if n not in found] if kind in NAMED else []
    for name in missing:
        print(f"error: no {NAMED[kind]} {name!r}", file=sys.stderr)
    return 1 if missing else 0


def listing(args: argparse.Namespace, kind: str) -> tuple[str, set[str]]:
    """The list of one kind in the output format, and the names and IDs it holds (to tell which NAMEs matched)."""
    names = args.names
    if kind in ("connections", "grants"):
        from tools.meshctl import mesh as meshcmd
        with client(args) as mesh:
            if kind == "grants":
                items = [g for g in mesh.mesh_grants() if not names or g.from_tenant in names]
                return meshcmd.format_grants(items, args.output), {g.from_tenant for g in items}
            conns = [c for c in mesh.mesh_list(tenant=args.tenant, slice_id=args.slice)
                     if not names or c.id in names]
        return meshcmd.format_connections(conns, args.output), {c.id for c in conns}
    if kind == "pools":
        from tools.meshctl import pools
        with client(args) as mesh:
            items = [p for p in mesh.list_pools() if not names or p.name in names]
        return pools.format_pools(items, args.output), {p.name for p in items}
    if kind == "models":
        from tools.meshctl import models
        with client(args) as mesh:
            items = [m for m in mesh.list_models(family=args.family, labels=dict(args.selector))
                     if not names or m.name in names]
        return models.format_models(items, args.output), {m.name for m in items}
    if kind in ("policies", "deployments", "replicas"):
        from tools.meshctl import autoscale, deploy
        with client(args) as mesh:
            if kind == "policies":
                items = [d for d in mesh.list_deployments(tenant=args.tenant) if not names or d.spec.name in names]
            else:
                items = [d for d in mesh.list_deployments(tenant=args.tenant, model=args.model,
                                                          labels=dict(args.selector))
                         if not names or d.spec.name in names]
        text = (autoscale.format_policies(items, args.output) if kind == "policies" else
                deploy.format_deployments(items, args.output) if kind == "deployments" else
                deploy.format_replicas(items, args.output))
        return text, {d.spec.name for d in items}
    if kind in ("migrations", "checkpoints"):
        from tools.meshctl import migrate
        with client(args) as mesh:
            if kind == "migrations":
                items = [m for m in mesh.list_migrations(tenant=args.tenant) if not names or m.id in names
                         or m.workload_id in names]
                return migrate.format_migrations(items, args.output), {m.id for m in items}
            items, usage = mesh.list_checkpoints_usage(tenant=args.tenant)
            items = [c for c in items if not names or c.id in names or c.workload_id in names]
        return migrate.format_checkpoints(items, args.output, usage=usage), {c.id for c in items}
    if kind == "workloads":
        from tools.meshctl import workloads
        items = workloads.fetch(args)
        return workloads.format_list(items, args.output), {w.id for w in items}
    from tools.meshctl.output import format_list
    items = fetch(args, kind)
    found = ({n.name for n in items} if kind == "nodes" else {g.node for g in items} if kind == "gpus" else
             {s.id for s in items} | {s.allocation_id for s in items})
    return format_list(kind, items, args.output), found
