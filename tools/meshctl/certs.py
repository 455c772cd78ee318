"""`meshctl certs init|issue`: a CA and the certificates of the control plane, agents and clients
(`meshctl config set-context`, in contexts.py, says where and as whom meshctl talks to a control plane)."""

from __future__ import annotations

import argparse

from tools.meshctl.common import CliError, HelpFormatter, info, out

CERTS_EPILOG = """\
examples:
  meshctl certs init --dir /etc/gpumesh/pki --host cp1.example.internal --host cp2.example.internal --host 10.0.0.5
  meshctl certs issue --dir /etc/gpumesh/pki --kind agent --name gpu-node-017
  meshctl certs issue --dir /etc/gpumesh/pki --kind client --name alice --tenant team-a --role tenant
  meshctl certs issue --dir /etc/gpumesh/pki --kind client --name ops --role admin
  meshctl certs issue --dir /etc/gpumesh/pki --kind server --name gateway-1 --host gw1.example.internal

Keep ca.key offline once the certificates are issued; copy to each agent only
ca.crt and its own <node>.crt/<node>.key.
"""


def register(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="make a CA and mTLS certificates", formatter_class=HelpFormatter,
                           description="A CA and the certificates gpumesh's mTLS uses (EC P-256).",
                           epilog=CERTS_EPILOG)
    csub = certs.add_subparsers(dest="certs_command", metavar="COMMAND", title="commands")
    i = csub.add_parser("init", help="create the CA and the control plane's certificate",
                        formatter_class=HelpFormatter, epilog=CERTS_EPILOG,
                        description="Create ca.crt/ca.key and controlplane.crt/controlplane.key in --dir.")
    i.add_argument("--dir", required=True, metavar="DIR", help="where the files go")
    i.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                   help="a DNS name or IP the control plane is reached by (repeatable; localhost and 127.0.0.1 "
                        "are always added)")
    i.add_argument("--force", action="store_true", help="replace an existing CA (every old certificate stops working)")
    i.set_defaults(func=run_init)

    s = csub.add_parser("issue", help="sign an agent, client or server certificate", formatter_class=HelpFormatter,
                        epilog=CERTS_EPILOG, description="Sign a certificate with the CA in --dir: "
                        "<name>.crt and <name>.key. An agent's name is its node name; a server certificate "
                        "(the gateway's serve_tls_cert, another server of the fleet) is valid for its --host "
                        "names.")
    s.add_argument("--dir", required=True, metavar="DIR", help="the CA's folder (from `meshctl certs init`)")
    s.add_argument("--kind", required=True, choices=("agent", "client", "server"),
                   help="agent (CN = node), client, or server (TLS server: serverAuth, OU=server)")
    s.add_argument("--name", required=True, help="node name (agent), user name (client) or the file's name (server)")
    s.add_argument("--host", action="append", default=[], metavar="NAME|IP",
                   help="server: a DNS name or IP its clients dial (repeatable, at least one)")
    s.add_argument("--tenant", default="", help="client: the tenant it acts for (not for admin)")
    s.add_argument("--role", default="", choices=("", "admin", "tenant", "viewer"), help="client: its role")
    s.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    s.set_defaults(func=run_issue)
    certs.set_defaults(func=lambda args: (certs.print_help(), 2)[1])


def run_init(args: argparse.Namespace) -> int:
    from mesh import tls
    try:
        tls.write_ca(args.dir, force=args.force)
        crt, key = tls.issue(args.dir, "server", tls.SERVER_CN, filename="controlplane",
                             hosts=tuple(dict.fromkeys([*args.host, "localhost", "127.0.0.1"])))
    except tls.TlsError as e:
        raise CliError(str(e)) from None
    info(f"CA: {args.dir}/ca.crt (its key ca.key signs every certificate: keep it safe)")
    out(f"{crt}\n{key}\n")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    from mesh import tls
    if args.kind == "client" and not args.role:
        raise CliError("--role is required for a client certificate (admin, tenant or viewer)")
    if args.kind == "server" and not args.host:
        raise CliError("--host is required for a server certificate (a DNS name or IP its clients dial)")
    if args.kind != "server" and args.host:
        raise CliError(f"--host is for server certificates, not {args.kind} ones")
    try:
        crt, key = tls.issue(args.dir, args.kind, args.name, tenant=args.tenant, role=args.role, days=args.days,
                             hosts=tuple(args.host))
    except tls.TlsError as e:
        raise CliError(str(e)) from None
    out(f"{crt}\n{key}\n")
    return 0
