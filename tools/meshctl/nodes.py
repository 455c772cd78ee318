"""`meshctl cordon|uncordon|drain NAME`: take nodes in and out of scheduling; `meshctl delete node NAME`:
retire a NotReady node for good; `meshctl gpu clear NODE INDEX`: take a quarantined GPU back through recovery
(docs/operations.md, GPU health)."""

from __future__ import annotations

import argparse

from tools.meshctl.common import client, out, subcommand


def register(sub: argparse._SubParsersAction) -> None:
    for name, verb, desc in (
            ("cordon", "cordoned", "Stop placing new slices on the node (its slices stay). Idempotent."),
            ("uncordon", "uncordoned", "Allow new slices on the node again. Idempotent.")):
        p = subcommand(sub, name, help=desc.split(" (")[0].split(".")[0].lower(), description=desc,
                       epilog=f"example:\n  meshctl {name} sim-node-01\n")
        p.add_argument("name", metavar="NAME", help="node name")
        p.set_defaults(func=run_cordon, verb=verb)

    d = subcommand(sub, "drain", help="cordon a node, migrate its workloads, evict its slices",
                   description="Cordon the node, live-migrate every running workload off it (to slices of the "
                               "same spec elsewhere), then evict its slices; their clients see the "
                               "eviction reason on Watch. Model replicas (deployments) are not evicted: each is "
                               "replaced on another node first and removed once its replacement is READY; with "
                               "--wait the command follows that until no replica is left on the node, printing "
                               "what it waits for (no room elsewhere: the replicas stay and keep serving). "
                               "`meshctl uncordon` ends a drain.",
                   epilog="examples:\n  meshctl drain sim-node-01 --dry-run\n  meshctl drain sim-node-01\n"
                          "  meshctl drain sim-node-01 --wait --wait-timeout 600\n")
    d.add_argument("name", metavar="NAME", help="node name")
    d.add_argument("--dry-run", action="store_true", help="only report what would be evicted")
    d.add_argument("--wait", action="store_true",
                   help="wait until every deployment replica on the node was replaced and removed")
    d.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS", help="seconds --wait waits (default 600); exit 1 after")
    d.set_defaults(func=run_drain)

    g = subcommand(sub, "gpu", help="GPU health actions (clear a quarantined GPU)",
                   description="GPU health actions. `clear` takes a GPU out of quarantine (fatal errors that "
                               "recurred within the health policy's window, failed resets, a failed row remap) or "
                               "out of a wait for a reboot: its fault history is forgotten and it goes back "
                               "through recovery (a reset once idle, then clean readings) before it takes slices.",
                   epilog="example:\n  meshctl gpu clear sim-node-01 3\n")
    g.add_argument("action", choices=("clear",), help="what to do")
    g.add_argument("node", metavar="NODE", help="node name")
    g.add_argument("index", metavar="INDEX", type=int, help="GPU index on the node")
    g.set_defaults(func=run_gpu)


def run_cordon(args: argparse.Namespace) -> int:
    from mesh.client import node_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        node = mesh.cordon(args.name) if args.command == "cordon" else mesh.uncordon(args.name)
    if args.output in ("json", "yaml"):
        out(dump(node_to_dict(node), args.output))
    else:
        out(f"node/{node.name or args.name} {args.verb}\n")
    return 0


def run_drain(args: argparse.Namespace) -> int:
    from mesh.client import node_to_dict, slice_to_dict
    from tools.meshctl.output import dump
    from mesh import errors

    def migrations(mesh) -> list:
        if args.dry_run:
            return []
        try:
            return mesh.list_migrations()
        except errors.MeshError:       # a control plane without MigrationService
            return []
    from tools.meshctl.progress import for_args
    with client(args) as mesh, for_args(args).waiting(
            f"{'checking' if args.dry_run else 'draining'} node/{args.name}"):
        before = {m.id for m in migrations(mesh)}
        resp = mesh.drain(args.name, dry_run=args.dry_run)
        migrated = [m for m in migrations(mesh) if m.id not in before and m.reason == "drain"]
    evicted = [slice_to_dict(s) for s in resp.evicted]
    replacing = [slice_to_dict(s) for s in resp.replacing]
    waited = 0
    if args.wait and not args.dry_run and replacing:
        waited = wait_replicas_off(args, quiet=args.output in ("json", "yaml"))
    if args.output in ("json", "yaml"):
        doc = {"node": node_to_dict(resp.node), "dry_run": args.dry_run, "evicted": evicted,
               "replacing": replacing}
        if args.wait:
            doc["replicas_left"] = waited
        out(dump(doc, args.output))
        return 1 if waited else 0
    from mesh.migrationapi import migration_phase
    lines = [f"migration/{m.id} of {m.workload_id}: {migration_phase(m)}"
             + (f" -> {m.target_node}" if m.target_node else "") + (f" ({m.message})" if m.message else "")
             for m in migrated]
    lines += [f"evicting slice/{s['id']} (tenant {s['tenant']}, gpu {s['gpu_index']})" for s in evicted]
    lines += [f"replacing replica {s['labels'].get('gpumesh.replica', '?')} of deployment "
              f"{s['labels'].get('gpumesh.deployment', '?')} (slice/{s['id']}): removed once a replacement is READY"
              for s in replacing]
    if args.dry_run:
        lines = [line.replace("evicting", "would evict").replace("replacing replica", "would replace replica")
                 for line in lines]
        lines.append(f"node/{args.name} would be drained: {len(evicted)} slice(s) evicted, {len(replacing)} "
                     f"replica(s) replaced first (dry run)")
    else:
        lines.append(f"node/{args.name} drained: {len(evicted)} slice(s) evicted"
                     + (f", {len(replacing)} replica(s) being replaced" if replacing else ""))
        if args.wait and replacing:
            lines.append(f"node/{args.name}: every replica replaced" if not waited else
                         f"node/{args.name}: {waited} replica(s) still on the node after {args.wait_timeout:g}s")
    out("\n".join(lines) + "\n")
    return 1 if waited else 0


def wait_replicas_off(args: argparse.Namespace, quiet: bool = False) -> int:
    """Follow the deployments until none has a replica on the node (0), or the timeout (the count left).
    Prints each new Draining condition message (what the drain waits for) unless `quiet`."""
    import sys
    import time
    deadline = time.monotonic() + args.wait_timeout
    said = set()
    with client(args) as mesh:
        while True:
            left = 0
            for d in mesh.list_deployments():
                on = [r for r in d.replicas if r.node == args.name]
                left += len(on)
                c = next((c for c in d.status.conditions if c.type == "Draining" and c.status), None)
                if on and c is not None and (d.spec.name, c.message) not in said and not quiet:
                    said.add((d.spec.name, c.message))
                    print(f"deployment/{d.spec.name}: {c.reason}: {c.message}", file=sys.stderr, flush=True)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(1.0)


def delete_node_to_dict(resp) -> dict:
    from mesh.client import node_to_dict
    return {"node": node_to_dict(resp.node), "slices": list(resp.slices), "allocations": list(resp.allocations),
            "workloads": list(resp.workloads), "migrations": list(resp.migrations),
            "connections": list(resp.connections), "replicas": list(resp.replicas)}


def run_delete_node(args: argparse.Namespace) -> int:
    """`meshctl delete node NAME` (registered with `delete pool`, tools/meshctl/pools.py)."""
    from tools.meshctl.output import dump
    from tools.meshctl.progress import for_args
    with client(args) as mesh, for_args(args).waiting(f"deleting node/{args.name}"):
        resp = mesh.delete_node(args.name)
    doc = delete_node_to_dict(resp)
    if args.output in ("json", "yaml"):
        out(dump(doc, args.output))
        return 0
    kinds = (("allocations", "allocation(s) released", "allocation/"), ("slices", "slice(s) deleted", "slice/"),
             ("workloads", "workload(s) failed", "workload/"), ("migrations", "migration(s) ended", "migration/"),
             ("connections", "mesh connection(s) disconnected", "connection/"),
             ("replicas", "replica(s) being replaced elsewhere", "replica/"))
    lines = [f"{len(doc[key])} {what}: {' '.join(prefix + i for i in doc[key])}" for key, what, prefix in kinds
             if doc[key]]
    lines.append(f"node/{args.name} deleted")
    out("\n".join(lines) + "\n")
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    from mesh.client import gpu_status_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        st = mesh.clear_gpu_quarantine(args.node, args.index)
    d = gpu_status_to_dict(st)
    if args.output in ("json", "yaml"):
        out(dump(d, args.output))
    else:
        out(f"gpu/{args.node}/{args.index} cleared: {d.get('health') or '-'}"
            f"{' (' + d['health_reason'] + ')' if d.get('health_reason') else ''}\n")
    return 0
