"""`meshctl describe model|checkpoint|gpu|connection NAME`: the kinds describe shows from their own list
and formatters (a model as `model describe`, a checkpoint from the checkpoint list, a GPU's row of `get
gpus -o wide` with the slices on it, a mesh connection with both buffers)."""

from __future__ import annotations

from typing import Any

from tools.meshctl.common import CliError

KINDS = {"model": "model", "models": "model",
         "checkpoint": "checkpoint", "checkpoints": "checkpoint", "ck": "checkpoint",
         "gpu": "gpu", "gpus": "gpu",
         "connection": "connection", "connections": "connection", "conn": "connection"}


def parse_gpu(name: str) -> tuple[str, int]:
    """`NODE/INDEX` -> (node, index)."""
    node, sep, index = name.rpartition("/")
    if not sep or not node or not index.isdigit():
        raise CliError(f"gpu: {name!r} is not NODE/INDEX (e.g. sim-node-01/3)")
    return node, int(index)


def describe(mesh: Any, kind: str, name: str, fmt: str) -> str:
    """The text (table, wide) or document (json, yaml) of one object of these kinds."""
    from tools.meshctl.describe import _with_events
    from tools.meshctl.output import dump
    table = fmt in ("table", "wide")
    if kind == "model":
        from mesh.modelapi import model_to_dict
        from tools.meshctl.models import format_model
        doc = model_to_dict(mesh.get_model(name))
        return format_model(doc) if table else dump(doc, fmt)
    if kind == "checkpoint":
        from mesh.migrationapi import checkpoint_to_dict
        found = [c for c in mesh.list_checkpoints() if c.id == name]
        if not found:
            raise CliError(f"no checkpoint {name!r} (meshctl get checkpoints lists them)")
        doc = checkpoint_to_dict(found[0])
        return format_checkpoint(doc) if table else dump(doc, fmt)
    if kind == "gpu":
        from mesh.client import gpu_status_to_dict, slice_to_dict
        node, index = parse_gpu(name)
        found = [g for g in mesh.list_gpus(node=node) if g.gpu.index == index]
        if not found:
            raise CliError(f"no gpu {index} on node {node!r} (meshctl get gpus --node {node} lists them)")
        doc = gpu_status_to_dict(found[0])
        doc["slice_list"] = [slice_to_dict(s) for s in mesh.list_slices(node=node) if s.gpu_index == index]
        evs = _with_events(mesh, "", doc, fmt, "Gpu", f"{node}/{index}")
        return (format_gpu(doc) + evs) if table else dump(doc, fmt)
    from mesh.meshapi import connection_to_dict
    doc = connection_to_dict(mesh.mesh_get(name))
    return format_connection(doc) if table else dump(doc, fmt)


def format_checkpoint(c: dict) -> str:
    from mesh.units import format_size
    from tools.meshctl.describe import _fields
    return _fields([("ID", c["id"]), ("Workload", c["workload_id"]), ("Tenant", c["tenant"]), ("Node", c["node"]),
                    ("Path", c["path"]), ("Step", c["step"]),
                    ("Size", f"{format_size(int(c['bytes']))} ({c['bytes']} bytes)"),
                    ("Took", f"{c['seconds']:.2f} s ({c['mb_per_s']:.1f} MB/s)"),
                    ("Encrypted", "yes" if c["encrypted"] else "no"), ("Created", c.get("created_at"))])


# the field names of `describe gpu` for the columns of `get gpus -o wide` (as `describe node` and `describe slice`
# word theirs: "GPU model", "Memory used", not the columns' capitalized "Mig", "Uuid", "Node-status")
GPU_FIELDS = {"NODE": "Node", "INDEX": "Index", "MODEL": "GPU model", "MIG": "MIG mode", "MEMORY": "Allocated",
              "COMPUTE": "Compute", "SLICES": "Slice count", "SHARING": "Sharing", "HEALTH": "Health",
              "UTIL": "Utilization", "USED": "Memory used", "PRESSURE": "Memory pressure", "TEMP": "Temperature",
              "THERMAL": "Thermal state", "POWER": "Power", "THROTTLE": "Throttle reasons", "LAYOUT": "MIG layout",
              "UUID": "UUID", "NODE-STATUS": "Node status"}


def format_gpu(d: dict) -> str:
    from tools.meshctl import output
    from tools.meshctl.describe import _fields, _indent
    text = _fields([(GPU_FIELDS.get(header, header.capitalize()), get(d)) for header, get, _ in output.gpu_columns()])
    cols = [c for c in output.slice_columns() if c[0] not in ("NODE", "GPU", "MESSAGE")]
    text += "Slices:\n" + _indent(output.table_of(d["slice_list"], cols) if d["slice_list"] else "<none>")
    return text


def format_connection(d: dict) -> str:
    from mesh.units import format_size
    from tools.meshctl.describe import _fields, _indent
    text = _fields([("ID", d["id"]), ("Tenant", d["tenant"]), ("State", d["state"]), ("Transport", d["transport"]),
                    ("Data path", d["data_path"]), ("Why", d["reason"]), ("Why not RDMA", d["fallback_reason"]),
                    ("Size", format_size(d["size_bytes"])), ("Message", d["message"]), ("Created", d["created_at"])])
    for side in ("a", "b"):
        b = d[side]
        text += f"Side {side.upper()} (slice {d['slice_' + side]}):\n" + _indent(_fields(
            [(k.replace("_", " ").capitalize(), v) for k, v in b.items()]).rstrip("\n"))
    return text
