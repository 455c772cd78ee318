"""`meshctl create pool`, `meshctl delete pool|node` (node: tools/meshctl/nodes.py), and the pool parts of `get pools` / `describe pool`."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, client, out, subcommand

EPILOG = """\
examples:
  meshctl create pool inference-a --gpu-model H100-80GB --isolation mps --max-slices 4
  meshctl create pool batch --node-selector tier=spot --max-gpus 2.5 --max-dollars-per-hour 10
  meshctl create pool -f pool.yaml                      # the shape `describe pool NAME -o yaml` prints
  meshctl get pools                                     # NAME SLICES GPUS $/H AVAILABLE DEPLOYMENTS
  meshctl describe pool inference-a                     # selector, quota, usage, deployments drawing from it
  meshctl update pool inference-a --max-slices 8         # the flags given replace those fields
  meshctl deploy smollm2-135m --pool inference-a --replicas 3
  meshctl delete pool inference-a
"""


def _pair(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return k, v


def _size(text: str) -> int:
    from mesh.units import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "create", help="create a resource pool", epilog=EPILOG,
                   description="Create a resource (pool): named GPU capacity with a quota that deployments draw from.")
    p.add_argument("kind", metavar="KIND", choices=("pool",), help="pool")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    _pool_flags(p, defaults=True)
    p.set_defaults(func=run_create)
    # `update pool` is registered by tools/meshctl/update.py (with `update deployment`)
    d = subcommand(sub, "delete", help="delete a resource pool or retire a node",
                   epilog="examples:\n  meshctl delete pool inference-a\n"
                          "  meshctl drain sim-node-02 --wait && ssh sim-node-02 systemctl stop mesh-agent\n"
                          "  meshctl delete node sim-node-02           # once `get nodes` shows it NotReady\n"
                          "  meshctl delete node sim-node-02 -o json   # what was ended, as a document\n",
                   description="Delete a resource. pool: refused while a deployment draws from it. node: retire a "
                               "NotReady node for good (drain it and stop its agent first; a READY node is "
                               "refused): its slices and their allocations, its workloads (FAILED), migrations "
                               "from or to it, mesh connections with a buffer there and its GPU health records "
                               "end; deployment replicas on it are replaced elsewhere; prints what was ended. If "
                               "its agent comes back it registers as a new node and tears down what it held.")
    d.add_argument("kind", metavar="KIND", choices=("pool", "node"), help="pool or node")
    d.add_argument("name", metavar="NAME")
    d.set_defaults(func=run_delete)


POOL_FLAGS = ("description", "gpu_model", "isolation", "node_selector", "tenant", "max_slices", "max_gpus",
              "max_memory", "max_dollars_per_hour")


def _pool_flags(p, defaults, file_flag: bool = True) -> None:
    """The pool's flags; with `defaults` None (update) a flag not given stays None (the field is kept)."""
    z = (lambda v: v) if defaults else (lambda v: None)
    if file_flag:
        p.add_argument("-f", "--file", default="", help="a YAML or JSON pool (name, selector, quota)")
    p.add_argument("--description", default=z(""))
    p.add_argument("--gpu-model", action="append", default=z([]), metavar="MODEL", help="repeatable (H100-80GB, ...)")
    p.add_argument("--isolation", action="append", default=z([]), metavar="KIND",
                   help="repeatable: mig, mps, timeshare, exclusive")
    p.add_argument("--node-selector", type=_pair, action="append", default=z([]), metavar="KEY=VALUE",
                   help="node labels that must match (repeatable)")
    p.add_argument("--tenant", action="append", default=z([]), metavar="TENANT",
                   help="repeatable: the tenants whose deployments may use the pool (none: every tenant)")
    p.add_argument("--max-slices", type=int, default=z(0), metavar="N", help="0: no limit")
    p.add_argument("--max-gpus", type=float, default=z(0.0), metavar="GPUS", help="GPU-equivalents (sum of shares)")
    p.add_argument("--max-memory", type=_size, default=z(0), metavar="SIZE", help="e.g. 40GiB")
    p.add_argument("--max-dollars-per-hour", type=float, default=z(0.0), metavar="DOLLARS")


def pool_from_args(args: argparse.Namespace) -> dict:
    if args.file:
        import yaml
        try:
            if args.file == "-":
                import sys
                doc = yaml.safe_load(sys.stdin)
            else:
                with open(args.file) as f:
                    doc = yaml.safe_load(f)
        except OSError as e:
            raise CliError(f"cannot read {args.file}: {e.strerror}") from None
        if args.name and isinstance(doc, dict):
            doc["name"] = args.name
        return doc
    if not args.name:
        raise CliError("a pool NAME (or -f FILE) is required")
    return {"name": args.name, "description": args.description, "tenants": args.tenant,
            "selector": {"gpu_models": args.gpu_model, "isolations": args.isolation,
                         "node_labels": dict(args.node_selector)},
            "quota": {"max_slices": args.max_slices, "max_gpus": args.max_gpus, "max_memory_bytes": args.max_memory,
                      "max_dollars_per_hour": args.max_dollars_per_hour}}


def run_create(args: argparse.Namespace) -> int:
    from mesh.poolapi import pool_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        p = mesh.create_pool(pool_from_args(args))
    out(dump(pool_to_dict(p), args.output) if args.output in ("json", "yaml") else f"pool/{p.name} created\n")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from mesh.poolapi import pool_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        if args.file:
            doc = pool_from_args(args)
        else:
            if not args.name:
                raise CliError("a pool NAME (or -f FILE) is required")
            doc = pool_to_dict(mesh.get_pool(args.name))
            sel, q = doc["selector"], doc["quota"]
            for flag, (where, key) in {"description": (doc, "description"), "gpu_model": (sel, "gpu_models"),
                                       "isolation": (sel, "isolations"), "max_slices": (q, "max_slices"),
                                       "max_gpus": (q, "max_gpus"), "max_memory": (q, "max_memory_bytes"),
                                       "max_dollars_per_hour": (q, "max_dollars_per_hour")}.items():
                if getattr(args, flag) is not None:
                    where[key] = getattr(args, flag)
            if args.node_selector is not None:
                sel["node_labels"] = dict(args.node_selector)
            if args.tenant is not None:
                doc["tenants"] = args.tenant
        p = mesh.update_pool(doc)
    out(dump(pool_to_dict(p), args.output) if args.output in ("json", "yaml")
        else f"pool/{p.name} updated (generation {p.generation})\n")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    if args.kind == "node":
        from tools.meshctl.nodes import run_delete_node
        return run_delete_node(args)
    with client(args) as mesh:
        p = mesh.delete_pool(args.name)
    out(f"pool/{p.name} deleted\n")
    return 0


def _limit(v: float, unit: str = "") -> str:
    return f"{v:g}{unit}" if v else "-"


def _avail(v: float) -> str:
    return "unlimited" if v < 0 else f"{v:g}"


def format_pools(items, fmt: str) -> str:
    from mesh.poolapi import pool_to_dict
    from tools.meshctl.output import dump, render_table
    docs = [pool_to_dict(p) for p in items]
    if fmt in ("json", "yaml"):
        return dump({"items": docs}, fmt)
    wide = fmt == "wide"
    headers = ["NAME", "SLICES", "GPUS", "$/HOUR", "AVAIL SLICES", "AVAIL GPUS", "DEPLOYMENTS"]
    if wide:
        headers += ["GPU MODELS", "ISOLATION", "NODE SELECTOR", "CAPACITY GPUS"]
    rows = []
    for p, d in zip(items, docs):
        u, q = p.usage, p.quota
        row = [p.name, f"{u.slices}/{_limit(q.max_slices)}", f"{u.gpus:.2f}/{_limit(q.max_gpus)}",
               f"{u.dollars_per_hour:.2f}/{_limit(q.max_dollars_per_hour)}", _avail(u.available_slices),
               _avail(round(u.available_gpus, 3)), ",".join(u.deployments) or "-"]
        if wide:
            row += [",".join(p.selector.gpu_models) or "any", ",".join(d["selector"]["isolations"]) or "any",
                    ",".join(f"{k}={v}" for k, v in sorted(p.selector.node_labels.items())) or "-", u.capacity_gpus]
        rows.append(row)
    return render_table(headers, rows) if rows else "No pools found.\n"


def describe_pool(p) -> str:
    from mesh.poolapi import pool_to_dict
    d = pool_to_dict(p)
    u, q = p.usage, p.quota
    gib = 2**30
    lines = [f"Name:          {p.name}", f"Description:   {p.description or '-'}",
             f"GPU models:    {', '.join(p.selector.gpu_models) or 'any'}",
             f"Isolation:     {', '.join(d['selector']['isolations']) or 'any'}",
             f"Tenants:       {', '.join(p.tenants) or 'every tenant'}",
             f"Node selector: {', '.join(f'{k}={v}' for k, v in sorted(p.selector.node_labels.items())) or '-'}",
             "Quota:",
             f"  max_slices:           {_limit(q.max_slices)}", f"  max_gpus:             {_limit(q.max_gpus)}",
             f"  max_memory:           {_limit(round(q.max_memory_bytes / gib, 2), ' GiB')}",
             f"  max_dollars_per_hour: {_limit(q.max_dollars_per_hour)}",
             "Usage:",
             f"  slices:        {u.slices} (available {_avail(u.available_slices)})",
             f"  GPUs:          {u.gpus:.3f} (available {_avail(round(u.available_gpus, 3))})",
             f"  memory:        {u.memory_bytes / gib:.2f} GiB (available "
             f"{_avail(round(u.available_memory_bytes / gib, 2)) if u.available_memory_bytes >= 0 else 'unlimited'})",
             f"  $/hour:        {u.dollars_per_hour:.4f} (available {_avail(round(u.available_dollars_per_hour, 4))})",
             f"  capacity:      {u.capacity_gpus} GPU(s), {u.capacity_memory_bytes / gib:.1f} GiB on schedulable nodes",
             f"Deployments:   {', '.join(u.deployments) or '<none>'}",
             f"Created:       {d.get('created_at', '')}  (generation {p.generation})"]
    return "\n".join(lines) + "\n"
