"""`meshctl get nodes|gpus|slices`: list resources as a table, or json/yaml `{"items": [...]}`."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, client, out, subcommand

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
}

EPILOG = """\
resources: nodes (node, no), gpus (gpu), slices (slice, sl), workloads (workload, wl),
           migrations (migration, mig), checkpoints (checkpoint, ck), models (model),
           deployments (deployment, deploy), replicas (replica: NAMEs are deployments),
           events (event, ev: what the control plane did and why),
           policies (policy, hpa: deployments' scaling policies and the autoscaler's last decision),
           pools (pool: resource pools with their usage)

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
  meshctl get policies -o wide                        # MIN MAX METRIC TARGET DESIRED MODE BOUND-BY ...
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "get", help="list nodes, GPUs or slices",
                   description="List nodes, GPUs or slices. Names or IDs narrow the list.",
                   epilog=EPILOG)
    p.add_argument("resource", metavar="RESOURCE", help="nodes | gpus | slices (or an alias)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these node names (nodes, gpus) or slice/allocation IDs (slices)")
    p.add_argument("--tenant", default="", help="slices (or events) of this tenant only")
    p.add_argument("--node", default="", help="GPUs, slices or workloads on this node only")
    p.add_argument("--slice", default="", metavar="ID", help="workloads on this slice only")
    p.add_argument("--state", default=None,
                   help="nodes: ready | not-ready; slices: pending | ready | releasing | failed | unknown")
    p.add_argument("--for", dest="for_", default="", metavar="KIND/NAME",
                   help="events: only those of this object (node/NAME, slice/ID, deployment/NAME, migration/ID, "
                        "allocation/ID, workload/ID, gpu/NODE/INDEX) or kind (node)")
    p.add_argument("--type", default="", help="events: Normal or Warning only")
    p.add_argument("--since", default=None, metavar="DURATION",
                   help="events: only those seen in the last 30s, 10m, 2h, 1d")
    p.add_argument("-w", "--watch", action="store_true", help="events: after the list, follow new events")
    p.set_defaults(func=run)


def fetch(args: argparse.Namespace, kind: str) -> list:
    with client(args) as mesh:
        if kind == "nodes":
            if args.tenant or args.node:
                raise CliError("--tenant and --node do not filter nodes")
            items = mesh.list_nodes(state=args.state)
            return [n for n in items if not args.names or n.name in args.names]
        if kind == "gpus":
            if args.tenant or args.state:
                raise CliError("--tenant and --state do not filter gpus")
            items = mesh.list_gpus(node=args.node)
            return [g for g in items if not args.names or g.node in args.names]
        items = mesh.list_slices(tenant=args.tenant, node=args.node, state=args.state)
        return [s for s in items
                if not args.names or s.id in args.names or s.allocation_id in args.names]


def run(args: argparse.Namespace) -> int:
    kind = RESOURCES.get(args.resource.lower())
    if kind is None:
        raise CliError(f"unknown resource {args.resource!r} (allowed: {', '.join(RESOURCES)})")
    if kind != "events" and (args.for_ or args.type or args.since or args.watch):
        raise CliError(f"--for, --type, --since and --watch apply to events, not {kind}")
    if kind == "events":
        from tools.meshctl import events
        with client(args) as mesh:
            return events.run(args, mesh)
    if kind == "pools":
        from tools.meshctl import pools
        with client(args) as mesh:
            items = [p for p in mesh.list_pools() if not args.names or p.name in args.names]
        out(pools.format_pools(items, args.output))
        return 0
    if kind == "models":
        from tools.meshctl import models
        with client(args) as mesh:
            items = [m for m in mesh.list_models() if not args.names or m.name in args.names]
        out(models.format_models(items, args.output))
        return 0
    if kind == "policies":
        from tools.meshctl import autoscale
        with client(args) as mesh:
            items = [d for d in mesh.list_deployments(tenant=args.tenant)
                     if not args.names or d.spec.name in args.names]
        out(autoscale.format_policies(items, args.output))
        return 0
    if kind in ("deployments", "replicas"):
        from tools.meshctl import deploy
        with client(args) as mesh:
            out(deploy.get(mesh, kind, args.names, args.tenant, args.output))
        return 0
    if kind in ("migrations", "checkpoints"):
        from tools.meshctl import migrate
        with client(args) as mesh:
            if kind == "migrations":
                items = [m for m in mesh.list_migrations(tenant=args.tenant) if not args.names or m.id in args.names
                         or m.workload_id in args.names]
                out(migrate.format_migrations(items, args.output))
            else:
                items = [c for c in mesh.list_checkpoints(tenant=args.tenant) if not args.names or c.id in args.names
                         or c.workload_id in args.names]
                out(migrate.format_checkpoints(items, args.output))
        return 0
    if kind == "workloads":
        from tools.meshctl import workloads
        out(workloads.format_list(workloads.fetch(args), args.output))
        return 0
    if args.slice:
        raise CliError(f"--slice does not filter {kind}")
    from tools.meshctl.output import format_list
    out(format_list(kind, fetch(args, kind), args.output))
    return 0
