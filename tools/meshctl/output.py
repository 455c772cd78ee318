"""Printing for meshctl: kubectl-like tables and json/yaml documents.

`get` prints a table (or `{"items": [...]}`), `describe` prints one object,
`alloc` prints `{"id": <allocation_id>, "slices": [...]}`. Functions that
take protobuf messages convert them with the mesh.client converters.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

FORMATS = ("table", "wide", "json", "yaml")

Column = tuple[str, Callable[[dict], Any], bool]  # header, cell getter, wide-only


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by three spaces, headers upper-case (kubectl style)."""
    table = [[str(h).upper() for h in headers]]
    table += [["<none>" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    return "\n".join(lines) + "\n"


def dump(doc: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if fmt == "yaml":
        import yaml
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    raise ValueError(f"unknown document format {fmt!r} (allowed: json, yaml)")


def age(rfc3339: str | None, now: datetime | None = None) -> str:
    """Kubectl-style age: 45s, 12m, 3h, 2d (None -> "<unknown>")."""
    if not rfc3339:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    now = now or datetime.now(timezone.utc)
    secs = max(0, int((now - then).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 3 * 3600:
        return f"{secs // 60}m"
    if secs < 48 * 3600:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def _size(n: int) -> str:
    from mesh.units import format_size
    return format_size(n)


def _share(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x else "0"


def _title(state: str) -> str:
    return "".join(p.capitalize() for p in state.split("_"))


def node_status(d: dict) -> str:
    """"Ready", "NotReady", "Ready,SchedulingDisabled", "Ready,SchedulingDisabled,Draining" (model
    replicas being replaced elsewhere), "NotReady,Deleting" (`meshctl delete node` in progress)."""
    status = _title(d["state"]) if d["state"] != "unspecified" else "Unknown"
    return status + (",SchedulingDisabled" if d["cordoned"] else "") + (",Draining" if d.get("draining") else "") \
        + (",Deleting" if d.get("deleting") else "")


def slice_columns(now: datetime | None = None) -> list[Column]:
    return [
        ("ID", lambda d: d["id"], False),
        ("TENANT", lambda d: d["tenant"] or ("<warm>" if d["labels"].get("gpumesh.io/warm") == "true" else ""), False),
        ("NODE", lambda d: d["node"], False),
        ("GPU", lambda d: d["gpu_index"] if d["node"] else None, False),
        ("ISOLATION", lambda d: d["isolation"], False),
        ("PROFILE", lambda d: d["profile"] or "-", False),
        ("MEMORY", lambda d: _size(d["memory_bytes"]), False),
        ("COMPUTE", lambda d: _share(d["compute_share"]), False),
        ("STATE", lambda d: _title(d["state"]), False),
        ("AGE", lambda d: age(d["created_at"], now), False),
        ("ALLOCATION", lambda d: d["allocation_id"], True),
        ("MODEL", lambda d: d["gpu_model"], True),
        ("PLACEMENT", lambda d: (f"{d['placement']['start']}+{d['placement']['size']}"
                                 if d["placement"] else "-"), True),
        ("PRIORITY", lambda d: d["priority"], True),
        ("DEVICE", lambda d: d["device_uuid"], True),
        ("MESSAGE", lambda d: d["message"], True),
    ]


def node_columns(now: datetime | None = None) -> list[Column]:
    return [
        ("NAME", lambda d: d["name"], False),
        ("STATUS", node_status, False),
        ("GPUS", lambda d: d["gpus"], False),
        ("MODEL", lambda d: ",".join(d["gpu_models"]), False),
        ("SLICES", lambda d: d["slices"], False),
        ("AGE", lambda d: age(d["registered_at"], now), False),
        ("READY-SLICES", lambda d: d["ready_slices"], True),
        ("BACKEND", lambda d: d["inventory"]["gpu_backend"], True),
        ("DRIVER", lambda d: d["inventory"]["driver_version"], True),
        ("AGENT", lambda d: d["agent_version"], True),
        ("HEARTBEAT", lambda d: age(d["last_heartbeat"], now), True),
        ("MESSAGE", lambda d: d["message"], True),
    ]


def gpu_columns(now: datetime | None = None) -> list[Column]:
    return [
        ("NODE", lambda d: d["node"], False),
        ("INDEX", lambda d: d["index"], False),
        ("MODEL", lambda d: d["model"], False),
        ("MIG", lambda d: d["mig_mode"], False),
        ("MEMORY", lambda d: f"{_size(d['allocated_memory_bytes'])}/{_size(d['memory_total_bytes'])}",
         False),
        ("COMPUTE", lambda d: _share(d["allocated_compute_share"]), False),
        ("SLICES", lambda d: d["slices"], False),
        ("SHARING", lambda d: d["sharing"] or "-", False),
        ("HEALTH", lambda d: d["health"] or "-", False),
        ("UTIL", lambda d: "-" if d["utilization"] is None else f"{d['utilization']:.0f}%", True),
        ("USED", lambda d: "-" if d["memory_used_bytes"] is None else _size(d["memory_used_bytes"]), True),
        ("PRESSURE", lambda d: d["memory_pressure"] or "-", True),
        ("TEMP", lambda d: "-" if d["temperature_c"] is None else f"{d['temperature_c']:.0f}C", True),
        ("THERMAL", lambda d: d["thermal_state"] or "-", True),
        ("POWER", lambda d: "-" if d["power_w"] is None else f"{d['power_w']:.0f}W", True),
        ("THROTTLE", lambda d: ",".join(d["throttle_reasons"]) or "-", True),
        ("LAYOUT", lambda d: ",".join(d["mig_layout"]) or "-", True),
        ("UUID", lambda d: d["uuid"], True),
        ("NODE-STATUS", lambda d: ("Ready" if d["node_ready"] else "NotReady")
         + (",SchedulingDisabled" if d["cordoned"] else ""), True),
    ]


def table_of(dicts: Sequence[dict], columns: list[Column], wide: bool = False) -> str:
    cols = [c for c in columns if wide or not c[2]]
    return render_table([c[0] for c in cols], [[c[1](d) for c in cols] for d in dicts])


KINDS = {"slices": slice_columns, "nodes": node_columns, "gpus": gpu_columns}


def converter(kind: str) -> Callable[[Any], dict]:
    from mesh import client
    return {"slices": client.slice_to_dict, "nodes": client.node_to_dict,
            "gpus": client.gpu_status_to_dict}[kind]


def format_list(kind: str, items: Sequence[Any], fmt: str, now: datetime | None = None) -> str:
    """`get` output for protobuf `items` of `kind` ("slices", "nodes", "gpus")."""
    dicts = [converter(kind)(i) for i in items]
    if fmt in ("json", "yaml"):
        return dump({"items": dicts}, fmt)
    if not dicts:
        return f"No {kind} found.\n"
    return table_of(dicts, KINDS[kind](now), wide=(fmt == "wide"))


def format_allocation(resp: Any, fmt: str, now: datetime | None = None) -> str:
    """`alloc` output: the allocation ID and its slices."""
    from mesh.client import allocation_to_dict
    doc = allocation_to_dict(resp)
    if fmt in ("json", "yaml"):
        return dump(doc, fmt)
    head = f"allocation/{doc['id']} ({len(doc['slices'])} slice{'s' if len(doc['slices']) != 1 else ''})\n"
    return head + table_of(doc["slices"], slice_columns(now), wide=(fmt == "wide"))


def emit(text: str, stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(text)
    (stream or sys.stdout).flush()
