"""`meshctl describe KIND NAME` (node, slice, workload, deployment, migration, pool, model, checkpoint, gpu,
connection): one object in detail, with its recent events (EventService) at the end, as kubectl describe
shows them. The last four live in tools/meshctl/describemore.py."""

from __future__ import annotations

import argparse
from typing import Any

from tools.meshctl.common import CliError, client, out, subcommand

EPILOG = """\
examples:
  meshctl describe node sim-node-01
  meshctl describe slice s-7f3a9c1e2b4d
  meshctl describe workload w-3f9a2c1d7e6b
  meshctl describe deployment chat
  meshctl describe migration m-1a2b3c4d5e6f
  meshctl describe pool inference-a
  meshctl describe model smollm2-135m                 # as `meshctl model describe`
  meshctl describe checkpoint c-1a2b3c4d5e6f
  meshctl describe gpu sim-node-01/3                   # one GPU: its row of `get gpus -o wide`, its slices
  meshctl describe connection m-0123456789ab           # a mesh connection with both buffers
  meshctl describe no sim-node-01 -o json    # the node with "gpu_status" and "slice_list"
  meshctl describe node sim-node-01 --horizon 60s   # forecasts 60 s ahead (default 15s)

A node and a slice show the forecasts that matter for them (docs/prediction.md): each GPU's
temperature and memory used at the horizon (the point, the interval, the model), and for a MIG
slice the Allocate requests per minute for its profile; --no-forecasts leaves them out.
"""

KINDS = {"node": "node", "nodes": "node", "no": "node",
         "slice": "slice", "slices": "slice", "sl": "slice",
         "workload": "workload", "workloads": "workload", "wl": "workload",
         "deployment": "deployment", "deployments": "deployment", "deploy": "deployment",
         "migration": "migration", "migrations": "migration", "mig": "migration",
         "pool": "pool", "pools": "pool"}
ALL_KINDS = "node, slice, workload, deployment, migration, pool, model, checkpoint, gpu, connection"


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "describe", help="show one object in detail: node, slice, workload, deployment, model, ...",
                   description="Show one object in detail (" + ALL_KINDS + "), with its recent events.",
                   epilog=EPILOG)
    p.add_argument("kind", metavar="KIND", help=ALL_KINDS.replace(", ", " | ") + " (or an alias: no, sl, wl, "
                                                 "deploy, mig, ck, conn)")
    p.add_argument("name", metavar="NAME", help="node name, slice ID, workload ID, deployment/pool/model name, "
                                                 "migration ID, checkpoint ID, NODE/INDEX (gpu), connection ID")
    p.add_argument("--horizon", default="15s", help="how far ahead the forecasts look (90s, 10m, 1h; default 15s)")
    p.add_argument("--no-forecasts", action="store_true", help="do not ask ForecastService")
    p.set_defaults(func=run)


def _fields(pairs: list[tuple[str, Any]], indent: str = "") -> str:
    width = max(len(k) for k, _ in pairs) + 2
    lines = []
    for key, value in pairs:
        text = "<none>" if value in (None, "", [], {}) else str(value)
        lines.append(f"{indent}{(key + ':').ljust(width)}{text}")
    return "\n".join(lines) + "\n"


def _indent(text: str, pad: str = "  ") -> str:
    return "".join(pad + line + "\n" for line in text.rstrip("\n").split("\n"))


def node_document(node: Any, gpus: list, slices: list) -> dict:
    from mesh.client import gpu_status_to_dict, node_to_dict, slice_to_dict
    doc = node_to_dict(node)
    doc["gpu_status"] = [gpu_status_to_dict(g) for g in gpus]
    doc["slice_list"] = [slice_to_dict(s) for s in slices]
    return doc


def format_node(doc: dict) -> str:
    from tools.meshctl import output
    inv = doc["inventory"]
    text = _fields([
        ("Name", doc["name"]), ("Status", output.node_status(doc)),
        ("Hostname", inv["hostname"]), ("GPU backend", inv["gpu_backend"]),
        ("Driver", inv["driver_version"]), ("CUDA", inv["cuda_version"]),
        ("Agent version", doc["agent_version"]),
        ("Registered", doc["registered_at"]), ("Agent registered", doc["agent_registered_at"]),
        ("Last heartbeat", doc["last_heartbeat"]),
        ("Message", doc["message"]),
        ("Labels", ",".join(f"{k}={v}" for k, v in sorted(inv["labels"].items()))),
        ("NVLink domains", " ".join("[" + ",".join(map(str, d)) + "]" for d in inv["nvlink_domains"])),
        ("Slices", f"{doc['slices']} ({doc['ready_slices']} ready)"),
    ])
    if inv["nics"]:
        text += "NICs:\n" + _indent(output.render_table(
            ["name", "kind", "rate", "gpus"],
            [[n["name"], n["kind"], f"{n['rate_gbps']}Gb/s", ",".join(map(str, n["gpus"])) or "-"]
             for n in inv["nics"]]))
    gpu_cols = [c for c in output.gpu_columns() if c[0] not in ("NODE", "NODE-STATUS")]
    text += "GPUs:\n" + _indent(output.table_of(doc["gpu_status"], gpu_cols, wide=True)
                                if doc["gpu_status"] else "<none>")
    slice_cols = [c for c in output.slice_columns() if c[0] not in ("NODE", "MESSAGE")]
    text += f"Slices on {doc['name']}:\n" + _indent(
        output.table_of(doc["slice_list"], slice_cols, wide=False) if doc["slice_list"] else "<none>")
    if doc.get("ib_ports"):
        text += "InfiniBand ports:\n" + _indent(output.render_table(
            ["device", "port", "state", "rate", "link layer", "guid"],
            [[p["device"], p["port"], p["state"], f"{p['rate_gbps']:g}Gb/s", p["link_layer"], p["port_guid"]]
             for p in doc["ib_ports"]]))
    if "event_list" not in doc:          # a control plane without EventService: its in-memory node events
        text += "Events:\n" + _indent(output.render_table(
            ["at", "type", "reason", "gpu", "message"],
            [[e["at"], e["type"], e["reason"], "-" if e["gpu"] is None else e["gpu"], e["message"]]
             for e in doc.get("events", [])[-20:]]) if doc.get("events") else "<none>")
    return text


def format_migration(d: dict) -> str:
    return _fields([
        ("ID", d.get("id")), ("Workload", d.get("workload_id")), ("Tenant", d.get("tenant")),
        ("Phase", d.get("phase")), ("Mode", d.get("mode")), ("Reason", d.get("reason")),
        ("Message", d.get("message")),
        ("Source", f"{d.get('source_node', '')} (slice {d.get('source_slice', '')})"),
        ("Target", f"{d.get('target_node', '')} (slice {d.get('target_slice', '')})" if d.get("target_node") else None),
        ("Checkpoint", d.get("checkpoint_id")), ("Created", d.get("created_at")), ("Updated", d.get("updated_at")),
    ])


def _with_events(mesh, text: str, doc: dict, fmt: str, kind: str, name: str, node: str = "") -> str:
    """Append the object's recent events (EventService); json/yaml get them as "event_list"."""
    from mesh import errors
    from mesh.eventapi import event_to_dict
    from tools.meshctl import events
    try:
        if kind == "Node":           # the node and its GPUs, as kubectl describe node shows the node's
            evs = sorted(events.recent(mesh, "Node", name) + events.recent(mesh, "Gpu", node=name),
                         key=lambda e: (e.last_timestamp.seconds, e.last_timestamp.nanos))[-20:]
        else:
            evs = events.recent(mesh, kind, name)
    except errors.MeshError as e:
        if "UNIMPLEMENTED" not in str(e) and e.code.name != "UNIMPLEMENTED":
            raise
        return text                  # a control plane without EventService
    doc["event_list"] = [event_to_dict(e) for e in evs]
    if fmt not in ("table", "wide"):
        return text
    return text + events.section(evs)


def format_slice(d: dict) -> str:
    from mesh.units import format_size
    placement = d["placement"]
    text = _fields([
        ("ID", d["id"]), ("Allocation", d["allocation_id"]), ("Tenant", d["tenant"]),
        ("State", d["state"]), ("Message", d["message"]),
        ("Node", d["node"]), ("GPU", f"{d['gpu_index']} ({d['gpu_uuid']})" if d["gpu_uuid"] else None),
        ("GPU model", d["gpu_model"]), ("Isolation", d["isolation"]), ("Profile", d["profile"]),
        ("Placement", f"start {placement['start']}, size {placement['size']}" if placement else None),
        ("Memory", f"{format_size(d['memory_bytes'])} ({d['memory_bytes']} bytes)"),
        ("Compute share", d["compute_share"]), ("Priority", d["priority"]),
        ("Device", d["device_uuid"]),
        ("Instances", f"GI {d['gpu_instance_id']}, CI {d['compute_instance_id']}"
         if d["isolation"] == "mig" and d["device_uuid"] else None),
        ("Created", d["created_at"]), ("Updated", d["updated_at"]),
        ("Labels", ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))),
    ])
    text += "Environment:\n"
    text += "".join(f"  {k}={v}\n" for k, v in sorted(d["env"].items())) or "  <none>\n"
    return text


def _forecasts(doc: dict, rows: list[dict]) -> str:
    """The forecasts section (json/yaml: "forecasts")."""
    from tools.meshctl import describeforecast
    doc["forecasts"] = rows
    return describeforecast.section(rows)


def run(args: argparse.Namespace) -> int:
    from tools.meshctl import describemore
    kind = KINDS.get(args.kind.lower())
    if kind is None and args.kind.lower() in describemore.KINDS:
        with client(args) as mesh:
            out(describemore.describe(mesh, describemore.KINDS[args.kind.lower()], args.name, args.output))
        return 0
    if kind is None:
        raise CliError(f"unknown kind {args.kind!r} (allowed: {ALL_KINDS})")
    from tools.meshctl import describeforecast as dfc
    from tools.meshctl.forecast_live import duration
    from tools.meshctl.output import dump
    try:
        horizon = duration(args.horizon)
    except argparse.ArgumentTypeError as e:
        raise CliError(f"--horizon: {e}") from None
    with client(args) as mesh:
        table = args.output in ("table", "wide")
        if kind == "node":
            node = mesh.get_node(args.name)
            doc = node_document(node, mesh.list_gpus(node=args.name), mesh.list_slices(node=args.name))
            fc = "" if args.no_forecasts else _forecasts(doc, dfc.safe(
                dfc.for_gpus, mesh, args.name, [g["index"] for g in doc["gpu_status"]], horizon))
            evs = _with_events(mesh, "", doc, args.output, "Node", args.name)
            text = (format_node(doc) + fc + evs) if table else dump(doc, args.output)
        elif kind == "pool":
            from mesh.poolapi import pool_to_dict
            from tools.meshctl import pools
            p = mesh.get_pool(args.name)
            doc = pool_to_dict(p)
            evs = _with_events(mesh, "", doc, args.output, "Pool", args.name)
            text = (pools.describe_pool(p) + evs) if table else dump(doc, args.output)
        elif kind == "deployment":
            from mesh.deployapi import deployment_to_dict
            from tools.meshctl import deploy
            doc = deployment_to_dict(mesh.get_deployment(args.name))
            evs = _with_events(mesh, "", doc, args.output, "Deployment", args.name)
            from tools.meshctl.autoscale import format_section
            text = (deploy.format_deployment(doc) + format_section(doc) + evs) if table else dump(doc, args.output)
        elif kind == "workload":
            from mesh.client import workload_to_dict
            from tools.meshctl.workloads import format_workload
            doc = workload_to_dict(mesh.get_workload(args.name))
            evs = _with_events(mesh, "", doc, args.output, "Workload", args.name)
            text = (format_workload(doc) + evs) if table else dump(doc, args.output)
        elif kind == "migration":
            from mesh.migrationapi import migration_to_dict
            doc = migration_to_dict(mesh.get_migration(args.name))
            evs = _with_events(mesh, "", doc, args.output, "Migration", args.name)
            text = (format_migration(doc) + evs) if table else dump(doc, args.output)
        else:
            from mesh.client import slice_to_dict
            doc = slice_to_dict(mesh.get_slice(args.name))
            fc = "" if args.no_forecasts else _forecasts(doc, dfc.safe(dfc.for_slice, mesh, doc, horizon))
            evs = _with_events(mesh, "", doc, args.output, "Slice", args.name)
            text = (format_slice(doc) + fc + evs) if table else dump(doc, args.output)
    out(text)
    return 0
