"""`meshctl mesh connect|get|disconnect|grant`: registered buffers between two slices."""

from __future__ import annotations

import argparse
import sys

from tools.meshctl.common import client, out, subcommand
from tools.meshctl.slices import size_arg

EPILOG = """\
examples:
  meshctl mesh connect s-1a2b3c4d5e6f s-6f5e4d3c2b1a --size 4MiB
  meshctl mesh connect s-1a2b3c4d5e6f s-6f5e4d3c2b1a --size 64MiB --transport tcp -o json
  meshctl mesh get                       # every connection
  meshctl mesh get m-0123456789ab -o yaml
  meshctl mesh disconnect m-0123456789ab
  meshctl mesh grant team-a team-b       # admin: team-a's slices may connect to team-b's
  meshctl mesh grant team-a team-b --revoke
  meshctl mesh grants                    # FROM TENANT  TO TENANT  AGE  (also: meshctl get grants)
  meshctl mesh grants -o yaml

-o json prints the connection with both buffer descriptors (address, length, rkey,
endpoint, shm segment or verbs QP); `get` prints {"items": [...]}.
"""


def register(sub: argparse._SubParsersAction) -> None:
    mesh = sub.add_parser("mesh", help="connect slices with registered (RDMA/TCP/shm) buffers",
                          description="Brokered buffers between slices of a tenant.", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = mesh.add_subparsers(dest="mesh_command", metavar="COMMAND", title="commands")
    mesh.set_defaults(func=lambda args: (mesh.print_help(sys.stderr), 2)[1])
    p = subcommand(cmds, "connect", help="register a buffer for each slice and connect them", epilog=EPILOG)
    p.add_argument("slice_a", metavar="SLICE_A")
    p.add_argument("slice_b", metavar="SLICE_B")
    p.add_argument("--size", type=size_arg, default=4 << 20, metavar="SIZE", help="buffer size (default: 4MiB)")
    p.add_argument("--transport", choices=("tcp", "shm", "verbs", "cuda_ipc"), default="",
                   help="force a transport (default: the best the topology offers)")
    p.set_defaults(func=run_connect)
    p = subcommand(cmds, "get", help="list connections, or show one", epilog=EPILOG)
    p.add_argument("id", nargs="?", metavar="ID")
    p.add_argument("--tenant", default="")
    p.add_argument("--slice", dest="slice_id", default="", metavar="SLICE")
    p.set_defaults(func=run_get)
    p = subcommand(cmds, "disconnect", help="revoke both buffers and drop the connection", epilog=EPILOG)
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=run_disconnect)
    p = subcommand(cmds, "grant", help="admin: allow a tenant's slices to connect to another tenant's",
                   epilog=EPILOG)
    p.add_argument("from_tenant", metavar="FROM_TENANT")
    p.add_argument("to_tenant", metavar="TO_TENANT")
    p.add_argument("--revoke", action="store_true", help="withdraw the grant")
    p.set_defaults(func=run_grant)
    p = subcommand(cmds, "grants", help="list the grants between tenants (MeshService.ListGrants)", epilog=EPILOG)
    p.set_defaults(func=run_grants)


def _show(conns, args, single: bool = False) -> None:
    out(format_connections(conns, args.output, single))


def format_connections(conns, fmt: str, single: bool = False) -> str:
    """Connections as a table (the reason under it for each one that is not READY), or json/yaml `{"items"}`
    (`single`: the one connection's document)."""
    from mesh.meshapi import connection_to_dict
    from mesh.units import format_size
    from tools.meshctl.output import dump, render_table
    docs = [connection_to_dict(c) for c in conns]
    if fmt in ("json", "yaml"):
        return dump(docs[0] if single else {"items": docs}, fmt)
    if not docs:
        return "No connections found.\n"
    headers = ["ID", "TENANT", "TRANSPORT", "DATA PATH", "STATE", "SLICE A", "SLICE B", "SIZE"]
    if fmt == "wide":
        headers += ["NODE A", "NODE B", "ENDPOINT A", "ENDPOINT B", "REASON", "WHY NOT RDMA"]
    rows = []
    for d in docs:
        row = [d["id"], d["tenant"], d["transport"], d["data_path"] or "-", d["state"], d["slice_a"], d["slice_b"],
               format_size(d["size_bytes"])]
        if fmt == "wide":
            row += [d["a"]["node"], d["b"]["node"], d["a"]["endpoint"], d["b"]["endpoint"], d["reason"],
                    d["fallback_reason"] or "-"]
        rows.append(row)
    table = render_table(headers, rows)
    # why a connection is not READY (a buffer that cannot be recovered, or that its agent found unusable)
    notes = [f"{d['id']} {d['state']}: {d['message']}" for d in docs if d["state"].lower() != "ready" and d["message"]]
    return table + "".join(f"\n{n}\n" if i == 0 else f"{n}\n" for i, n in enumerate(notes))


def run_connect(args) -> int:
    with client(args) as mesh:
        _show([mesh.mesh_connect(args.slice_a, args.slice_b, args.size, args.transport)], args, single=True)
    return 0


def run_get(args) -> int:
    with client(args) as mesh:
        if args.id:
            _show([mesh.mesh_get(args.id)], args, single=True)
        else:
            _show(mesh.mesh_list(tenant=args.tenant, slice_id=args.slice_id), args)
    return 0


def run_disconnect(args) -> int:
    with client(args) as mesh:
        _show([mesh.mesh_disconnect(args.id)], args, single=True)
    return 0


def run_grant(args) -> int:
    from mesh.meshapi import grant_to_dict
    from tools.meshctl.output import dump
    with client(args) as mesh:
        g = grant_to_dict(mesh.mesh_grant(args.from_tenant, args.to_tenant, args.revoke))
    if args.output in ("json", "yaml"):
        out(dump(g, args.output))
    else:
        out(f"{'revoked' if args.revoke else 'granted'}: slices of {g['from_tenant']} may "
            f"{'no longer ' if args.revoke else ''}connect to slices of {g['to_tenant']}\n")
    return 0


def format_grants(grants, fmt: str) -> str:
    from mesh.meshapi import grant_to_dict
    from tools.meshctl.output import age, dump, render_table
    docs = [grant_to_dict(g) for g in grants]
    if fmt in ("json", "yaml"):
        return dump({"items": docs}, fmt)
    if not docs:
        return "No grants found.\n"
    headers = ["FROM TENANT", "TO TENANT", "AGE"] + (["CREATED"] if fmt == "wide" else [])
    return render_table(headers, [[d["from_tenant"], d["to_tenant"], age(d["created_at"])]
                                  + ([d["created_at"] or "-"] if fmt == "wide" else []) for d in docs])


def run_grants(args) -> int:
    with client(args) as mesh:
        out(format_grants(mesh.mesh_grants(), args.output))
    return 0
