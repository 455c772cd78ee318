"""`meshctl get servingview [DEPLOYMENT...]`: what the gateway routes by (ServingViewService.Watch), as a
table of the view's replicas (-o wide: their GPU's telemetry and whether the view carries their key), or
the whole snapshot as json/yaml with replica keys redacted; `-w` prints a fresh snapshot whenever one
differs from the last (the stream's heartbeats, which change only `sequence` and `at`, are left out)."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

from tools.meshctl.common import CliError, out


def _narrowed(doc: dict, names: list[str]) -> dict:
    """The snapshot with only the named deployments (their models, GPUs and keys stay as sent)."""
    if names:
        doc["deployments"] = [d for d in doc["deployments"] if d["name"] in names]
    return doc


def rows(doc: dict) -> list[dict]:
    """One row per replica of the view, with its GPU's status (from `gpus`) and whether a key came."""
    gpus = {(g["node"], g["index"]): g for g in doc["gpus"]}
    keys = doc["replica_api_keys"]
    return [{**r, "model": f"{d['model']}/{d['variant']}" if d["variant"] else d["model"],
             "gpu": gpus.get((r["node"], r["gpu_index"])), "has_key": r["id"] in keys}
            for d in doc["deployments"] for r in d["replica_list"]]


def columns(now: datetime | None = None) -> list:
    from tools.meshctl.output import age

    def gpu(r: dict, key: str) -> Any:
        return r["gpu"].get(key) if r["gpu"] else None
    return [
        ("DEPLOYMENT", lambda r: r["deployment"], False),
        ("REPLICA", lambda r: r["id"], False),
        ("MODEL", lambda r: r["model"], False),
        ("STATE", lambda r: r["state"], False),
        ("ENDPOINT", lambda r: f"{r['scheme']}://{r['endpoint']}" if r["endpoint"] else "-", False),
        ("AGE", lambda r: age(r["created_at"], now), False),
        ("NODE", lambda r: r["node"] or "-", True),
        ("GPU", lambda r: r["gpu_index"] if r["node"] else "-", True),
        ("GPU HEALTH", lambda r: gpu(r, "health") or "-", True),
        ("MEMORY", lambda r: gpu(r, "memory_pressure") or "-", True),
        ("THERMAL", lambda r: gpu(r, "thermal_state") or "-", True),
        ("KEY", lambda r: "yes" if r["has_key"] else "-", True),
    ]


def format_view(doc: dict, fmt: str, now: datetime | None = None) -> str:
    from tools.meshctl.output import dump, table_of
    if fmt in ("json", "yaml"):
        return dump(doc, fmt)
    items = rows(doc)
    head = (f"# serving view {doc['sequence']} at {doc['at'] or '<unknown>'}: {len(doc['deployments'])} "
            f"deployment(s), {len(doc['models'])} model(s), {len(doc['gpus'])} GPU(s)\n")
    return head + (table_of(items, columns(now), wide=(fmt == "wide")) if items else "No replicas in the view.\n")


def interval_ms(seconds: float | None, watch: bool) -> int:
    """WatchServingViewRequest.interval_ms for `--interval SECONDS` (0: the control plane's 500 ms)."""
    if seconds is None:
        return 0
    if not watch:
        raise CliError("--interval applies to servingview with -w (it paces the watch's comparisons)")
    if not 0.1 <= seconds <= 60:            # nan too
        raise CliError(f"--interval: {seconds:g} is outside 0.1..60 seconds")
    return round(seconds * 1000)


def run(mesh: Any, names: list[str], fmt: str, watch: bool, interval_ms: int = 0) -> int:
    from mesh.servingviewapi import serving_view_to_dict
    if not watch:
        doc = _narrowed(serving_view_to_dict(mesh.serving_view()), names)
        missing = sorted(set(names) - {d["name"] for d in doc["deployments"]})
        out(format_view(doc, fmt))
        for name in missing:      # as `get deployments NAME`: said on stderr, the rest still printed, exit 1
            print(f"error: no deployment {name!r} in the serving view (not there, or not yours)", file=sys.stderr)
        return 1 if missing else 0
    last = None
    try:
        for view in mesh.watch_serving_view(interval_ms=interval_ms):
            doc = _narrowed(serving_view_to_dict(view), names)
            same = {k: v for k, v in doc.items() if k not in ("sequence", "at")}
            if same == last:
                continue
            last = same
            if fmt == "json":
                out(json.dumps(doc) + "\n")                    # a JSON line per snapshot
            elif fmt == "yaml":
                out("---\n" + format_view(doc, fmt))           # a YAML document per snapshot
            else:
                out(format_view(doc, fmt) + "\n")
    except KeyboardInterrupt:
        pass
    return 0
