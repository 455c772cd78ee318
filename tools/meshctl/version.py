"""`meshctl version` (as `kubectl version`): this meshctl's release, the control plane's it reaches (leader or
standby), the etcd members' (admins) and the agents', with a warning where they differ in minor release: HA
control planes and agents are upgraded one by one, and a mixed fleet is what an operator checks first."""

from __future__ import annotations

import argparse
from collections import Counter

from tools.meshctl.common import client, info, out, subcommand

EPILOG = """\
examples:
  meshctl version                 # client, control plane, etcd members, agents
  meshctl version --client        # this meshctl only (no control plane needed)
  meshctl version -o json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "version", help="versions of meshctl, the control plane, etcd and the agents",
                   epilog=EPILOG)
    p.add_argument("--client", action="store_true", help="this meshctl's version only")
    p.set_defaults(func=run)


def _agent_release(agent_version: str) -> str:
    """'0.1.0' of 'gpumesh-agent/0.1.0'."""
    return agent_version.rpartition("/")[2]


def document(server, nodes) -> dict:
    from mesh import version as release
    doc = {"client": {"version": release.VERSION, "api": release.API, **release.runtime()}}
    if server is None:
        return doc
    doc["server"] = {"version": server.version, "api": server.api, "python": server.python,
                     "grpcio": server.grpcio, "protobuf": server.protobuf, "identity": server.identity,
                     "role": "leader" if server.leader else "standby"}
    if server.etcd_members:
        doc["etcd"] = dict(sorted(server.etcd_members.items()))
    if nodes is not None:
        doc["agents"] = dict(sorted(Counter(_agent_release(n.agent_version) or "unknown" for n in nodes).items()))
    return doc


def skew(doc: dict) -> list[str]:
    """Warnings: a minor release apart from the control plane's (client, agents), or another API."""
    from mesh.version import minor
    server = doc.get("server")
    if server is None:
        return []
    want = minor(server["version"])
    warn = []
    if doc["client"]["api"] != server["api"]:
        warn.append(f"meshctl speaks {doc['client']['api']}, the control plane {server['api']}")
    if minor(doc["client"]["version"]) != want:
        warn.append(f"meshctl {doc['client']['version']} and control plane {server['version']} differ in minor "
                    "release")
    for v, n in doc.get("agents", {}).items():
        if v != "unknown" and minor(v) != want:
            warn.append(f"{n} agent(s) run {v}, the control plane {server['version']}")
    return warn


def _text(doc: dict) -> str:
    c = doc["client"]
    lines = [f"Client Version: {c['version']} ({c['api']}, Python {c['python']}, grpcio {c['grpcio']})"]
    s = doc.get("server")
    if s is not None:
        lines.append(f"Server Version: {s['version']} ({s['api']}, Python {s['python']}, grpcio {s['grpcio']}; "
                     f"{s['role']} {s['identity'] or '-'})")
    for endpoint, v in doc.get("etcd", {}).items():
        lines.append(f"etcd {endpoint}: {v or 'not answering'}")
    if "agents" in doc:
        lines.append("Agents: " + (", ".join(f"{v} ({n} node{'s' if n != 1 else ''})"
                                             for v, n in doc["agents"].items()) or "none registered"))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from tools.meshctl.output import dump
    server = nodes = None
    if not args.client:
        with client(args) as mesh:
            server = mesh.version()
            nodes = mesh.list_nodes()
    doc = document(server, nodes)
    for w in skew(doc):
        info(f"WARNING: {w}")
    out(dump(doc, args.output) if args.output in ("json", "yaml") else _text(doc))
    return 0
