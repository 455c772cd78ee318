"""One screen of `meshctl top`, drawn from a `Data` and the viewer's choices (pure: no I/O).

Three views, each fitted to the terminal (80x24 is the smallest it is laid out for):

* gpus: a row per GPU: node, index, model, its MIG slots (8 memory slots, then 7 compute slices; each
  cell the holding tenant's symbol in the tenant's colour, `·` free, `▒` carved but held by no slice
  the caller sees), utilization, memory used/total coloured by memory pressure, temperature coloured by
  thermal state, the GPU's level (worst of pressure, thermal, health) and its health;
* slices: a row per slice, grouped by tenant;
* deployments: a row per deployment with its ready/wanted replicas and their states;
* events: the newest events (EventService), warnings in yellow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mesh import fleetview
from tools.meshctl.top.feed import Data

VIEWS = ("gpus", "slices", "deployments", "events")
LABELS = {"gpus": "gpus", "slices": "slices", "deployments": "deploy", "events": "events"}
SORTS = {"gpus": ("node", "util", "memory", "temp", "level"),
         "slices": ("tenant", "node", "age", "memory"),
         "deployments": ("name", "tenant", "ready"),
         "events": ("age", "type", "object")}
LEVEL_STYLE = {"ok": "green", "warm": "yellow", "hot": "dark_orange", "critical": "bold red",
               "unhealthy": "bold magenta"}
PRESSURE_STYLE = {"low": "green", "normal": "green", "high": "dark_orange", "critical": "bold red"}
THERMAL_STYLE = {"normal": "green", "warning": "yellow", "throttling": "dark_orange", "critical": "bold red"}
TENANT_COLOURS = ("cyan", "magenta", "bright_blue", "yellow", "bright_green", "bright_red", "blue",
                  "bright_magenta", "bright_cyan", "green")
FREE, CARVED = "·", "▒"
CHROME = 5                        # lines around the table: title, keys, table header, legend, status


@dataclass
class View:
    view: str = "gpus"
    sort: dict[str, str] = field(default_factory=lambda: {v: s[0] for v, s in SORTS.items()})
    reverse: bool = False
    tenant: str = ""
    node: str = ""
    endpoint: str = ""

    def next_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]

    def next_sort(self) -> None:
        keys = SORTS[self.view]
        self.sort[self.view] = keys[(keys.index(self.sort[self.view]) + 1) % len(keys)]

    def next_tenant(self, data: Data) -> None:
        self.tenant = _cycle(sorted({s["tenant"] for s in data.slices.values()} |
                                    {d["tenant"] for d in data.deployments}), self.tenant)

    def next_node(self, data: Data) -> None:
        self.node = _cycle(sorted({g["node"] for g in data.gpus}), self.node)


def _cycle(options: list[str], now: str) -> str:
    """"" (all), then each option, then "" again."""
    seq = [""] + [o for o in options if o]
    return seq[(seq.index(now) + 1) % len(seq)] if now in seq else ""


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.0f}"


def tenant_style(symbols: dict[str, str], tenant: str) -> str:
    order = sorted(symbols)
    return TENANT_COLOURS[order.index(tenant) % len(TENANT_COLOURS)] if tenant in symbols else "white"


def slot_text(slots: dict, symbols: dict[str, str]) -> Text:
    """8 memory cells, a space, 7 compute cells; every other instance drawn in reverse video, so two
    neighbouring instances of one tenant read as two."""
    t = Text()
    for part, cells in (("memory", slots["memory"]), ("compute", slots["compute"])):
        if part == "compute":
            t.append(" ")
        alt, prev = False, None
        for c in cells:
            if c is not None and c is not prev:
                alt = not alt
            prev = c
            if c is None:
                t.append(FREE, style="grey42")
            elif not c["tenant"]:
                t.append(CARVED, style="grey62")
            else:
                style = f"bold {tenant_style(symbols, c['tenant'])}" + ("" if alt else " reverse")
                t.append(symbols.get(c["tenant"], "?"), style=style)
    return t


def _gpu_key(sort: str):
    return {"node": lambda g: (g["node"], g["index"]),
            "util": lambda g: -(g["utilization"] or 0),
            "memory": lambda g: -(g["memory_used_bytes"] or 0),
            "temp": lambda g: -(g["temperature_c"] or 0),
            "level": lambda g: -fleetview.LEVELS.index(fleetview.level(g))}[sort]


def gpu_table(data: Data, view: View, rows: int, symbols: dict[str, str]) -> tuple[Table, int]:
    slices = list(data.slices.values())
    gpus = [g for g in data.gpus if not view.node or g["node"] == view.node]
    if view.tenant:
        held = {(s["node"], s["gpu_index"]) for s in slices if s["tenant"] == view.tenant}
        gpus = [g for g in gpus if (g["node"], g["index"]) in held]
    gpus.sort(key=_gpu_key(view.sort["gpus"]), reverse=view.reverse)
    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold", expand=False)
    for name, kw in (("NODE", dict(max_width=14, no_wrap=True, overflow="ellipsis")), ("#", dict(justify="right")),
                     ("MODEL", dict(max_width=9, no_wrap=True, overflow="crop")),
                     ("MEM SLOTS CMP", dict(no_wrap=True)), ("UTIL", dict(justify="right")),
                     ("MEM GiB", dict(justify="right", no_wrap=True)), ("TEMP", dict(justify="right")),
                     ("LEVEL", dict(no_wrap=True)), ("HEALTH", dict(no_wrap=True, max_width=10, overflow="ellipsis"))):
        t.add_column(name, **kw)
    for g in gpus[:rows]:
        lvl = fleetview.level(g)
        util = "-" if g["utilization"] is None else f"{g['utilization']:.0f}%"
        mem = Text(f"{_gib(g['memory_used_bytes'])}/{_gib(g['memory_total_bytes'])}",
                   style=PRESSURE_STYLE.get(g["memory_pressure"] or "", ""))
        temp = Text("-" if g["temperature_c"] is None else f"{g['temperature_c']:.0f}C",
                    style=THERMAL_STYLE.get(g["thermal_state"] or "", ""))
        health = Text(g["health"] or "-", style="" if g["health"] in (None, "healthy") else "bold magenta")
        node = Text(g["node"], style="" if g["node_ready"] else "red")
        if g["cordoned"]:
            node.stylize("yellow")
        t.add_row(node, str(g["index"]), g["model"].split("-")[0],
                  slot_text(fleetview.gpu_slots(g, slices), symbols), util, mem, temp,
                  Text(lvl, style=LEVEL_STYLE[lvl]), health)
    return t, len(gpus)


def _age(iso: str | None, now: float) -> str:
    if not iso:
        return "-"
    from datetime import datetime
    s = max(0.0, now - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    return (f"{s:.0f}s" if s < 90 else f"{s / 60:.0f}m" if s < 5400 else f"{s / 3600:.0f}h" if s < 172800
            else f"{s / 86400:.0f}d")


def slice_table(data: Data, view: View, rows: int, symbols: dict[str, str]) -> tuple[Table, int]:
    slices = [s for s in data.slices.values() if (not view.tenant or s["tenant"] == view.tenant)
              and (not view.node or s["node"] == view.node)]
    key = {"tenant": lambda s: (s["tenant"], s["node"], s["gpu_index"], s["id"]),
           "node": lambda s: (s["node"], s["gpu_index"], s["id"]),
           "age": lambda s: s["created_at"] or "",
           "memory": lambda s: -s["memory_bytes"]}[view.sort["slices"]]
    slices.sort(key=key, reverse=view.reverse)
    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for name in ("SLICE", "TENANT", "NODE/GPU", "KIND", "MEM GiB", "CMP", "STATE", "AGE"):
        t.add_column(name, no_wrap=True, overflow="ellipsis", justify="right" if name in ("MEM GiB", "CMP") else "left")
    now = time.time()
    for s in slices[:rows]:
        kind = f"{s['profile']}@{(s['placement'] or {}).get('start', '?')}" if s["profile"] else s["isolation"]
        state = Text(s["state"], style={"ready": "green", "pending": "yellow", "failed": "red"}.get(s["state"], ""))
        t.add_row(s["id"], Text(f"{symbols.get(s['tenant'], '?')} {s['tenant']}",
                                style=tenant_style(symbols, s["tenant"])),
                  f"{s['node']}/{s['gpu_index']}", kind, f"{s['memory_bytes'] / 2**30:.1f}",
                  f"{s['compute_share'] * 100:.0f}%", state, _age(s["created_at"], now))
    return t, len(slices)


def deployment_table(data: Data, view: View, rows: int) -> tuple[Table, int]:
    deps = [d for d in data.deployments if (not view.tenant or d["tenant"] == view.tenant)
            and (not view.node or any(r.get("node") == view.node for r in d["replica_list"]))]
    key = {"name": lambda d: d["name"], "tenant": lambda d: (d["tenant"], d["name"]),
           "ready": lambda d: (d["status"]["ready_replicas"] - d["replicas"], d["name"])}[view.sort["deployments"]]
    deps.sort(key=key, reverse=view.reverse)
    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for name in ("NAME", "TENANT", "MODEL", "READY", "REPLICAS", "RATE", "TTFT"):
        t.add_column(name, no_wrap=True, overflow="ellipsis")
    for d in deps[:rows]:
        ready = d["status"]["ready_replicas"]
        states: dict[str, int] = {}
        for r in d["replica_list"]:
            states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
        # Rate and time to first token come from the gateway's serving metrics, which deployments do not
        # carry yet: "-" until DeploymentStatus has them.
        t.add_row(d["name"], d["tenant"], d["model"],
                  Text(f"{ready}/{d['replicas']}", style="green" if ready >= d["replicas"] else "yellow"),
                  " ".join(f"{n} {s}" for s, n in sorted(states.items())) or "-", "-", "-")
    return t, len(deps)


def event_table(data: Data, view: View, rows: int, width: int = 80) -> tuple[Table, int]:
    evs = [e for e in data.events if (not view.tenant or e["tenant"] == view.tenant)
           and (not view.node or e["node"] == view.node)]
    key = {"age": lambda e: "", "type": lambda e: e["type"] != "Warning",
           "object": lambda e: (e["kind"], e["name"])}[view.sort["events"]]
    evs.sort(key=key, reverse=view.reverse)           # stable: newest first within each key
    t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    for name, lo, hi in (("AGE", 3, 4), ("TYPE", 7, 7), ("REASON", 6, 16), ("OBJECT", 8, 22)):
        t.add_column(name, no_wrap=True, overflow="ellipsis", min_width=lo, max_width=hi)
    t.add_column("MESSAGE", no_wrap=True, overflow="ellipsis", max_width=max(10, width - 4 - 7 - 16 - 22 - 4))
    now = time.time()
    for e in evs[:rows]:
        msg = e["message"] + (f" (x{e['count']})" if e["count"] > 1 else "")
        t.add_row(_age(e["last_timestamp"], now), Text(e["type"], style="yellow" if e["type"] == "Warning" else ""),
                  e["reason"], f"{e['kind']}/{e['name']}", msg)
    return t, len(evs)


def render(data: Data, view: View, width: int = 80, height: int = 24) -> Group:
    slices = list(data.slices.values())
    symbols = fleetview.tenant_symbols([s["tenant"] for s in slices])
    rows = max(1, height - CHROME)
    nodes = len({g["node"] for g in data.gpus})
    title = Text.assemble(("gpumesh top", "bold"), f"  {view.endpoint}  ",
                          f"{nodes} nodes {len(data.gpus)} GPUs {len(slices)} slices {len(data.deployments)} deploys",
                          ("  " + time.strftime("%H:%M:%S", time.localtime(data.at)) if data.at else ""))
    keys = Text()
    for v in VIEWS:
        keys.append(f"[{v[0]}]{LABELS[v]}", style="reverse bold" if v == view.view else "")
        keys.append(" ")
    keys.append(f"o:sort={view.sort[view.view]}{'↓' if view.reverse else ''}"
                f" t:tenant={view.tenant or 'all'} n:node={view.node or 'all'} q:quit")
    for line in (title, keys):
        line.truncate(width, overflow="ellipsis")
        line.no_wrap = True
    if view.view == "gpus":
        table, total = gpu_table(data, view, rows, symbols)
        legend = Text.assemble(*[(f"{sym}", f"bold {tenant_style(symbols, t)}") if i % 2 == 0 else (f"={t} ", "")
                                 for t, sym in sorted(symbols.items(), key=lambda x: x[1]) for i in (0, 1)],
                               (f"{FREE}", "grey42"), "free ", (f"{CARVED}", "grey62"), "carved  8 mem|7 cmp")
    elif view.view == "slices":
        table, total = slice_table(data, view, rows, symbols)
        legend = Text(f"{len(symbols)} tenants")
    elif view.view == "deployments":
        table, total = deployment_table(data, view, rows)
        legend = Text("RATE/TTFT: from serving metrics when deployments report them")
    else:
        table, total = event_table(data, view, rows, width)
        legend = Text(f"{total} events")
    if total > rows:
        legend = Text.assemble((f"… {total - rows} more rows (filter with t/n) ", "yellow"), legend)
    status = Text("; ".join(f"{k}: {v}" for k, v in sorted(data.errors.items())), style="red") if data.errors \
        else Text("")
    legend.truncate(width, overflow="ellipsis")
    return Group(title, keys, table, legend, status)
