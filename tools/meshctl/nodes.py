"""`meshctl cordon|uncordon|drain NAME`: take nodes in and out of scheduling; `meshctl gpu clear NODE
INDEX`: take a quarantined GPU back through recovery (docs/operations.md, GPU health)."""

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
                               "eviction reason on Watch.",
                   epilog="examples:\n  meshctl drain sim-node-01 --dry-run\n  meshctl drain sim-node-01\n")
    d.add_argument("name", metavar="NAME", help="node name")
    d.add_argument("--dry-run", action="store_true", help="only report what would be evicted")
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
    if args.output in ("json", "yaml"):
        out(dump({"node": node_to_dict(resp.node), "dry_run": args.dry_run, "evicted": evicted},
                 args.output))
        return 0
    from mesh.migrationapi import migration_phase
    lines = [f"migration/{m.id} of {m.workload_id}: {migration_phase(m)}"
             + (f" -> {m.target_node}" if m.target_node else "") + (f" ({m.message})" if m.message else "")
             for m in migrated]
    lines += [f"evicting slice/{s['id']} (tenant {s['tenant']}, gpu {s['gpu_index']})" for s in evicted]
    if args.dry_run:
        lines = [line.replace("evicting", "would evict") for line in lines]
        lines.append(f"node/{args.name} would be drained: {len(evicted)} slice(s) evicted (dry run)")
    else:
        lines.append(f"node/{args.name} drained: {len(evicted)} slice(s) evicted")
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
