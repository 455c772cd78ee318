"""The forecasts `meshctl describe node|slice` shows: for each GPU of the node (or the slice's GPU),
its temperature and memory used at the load horizon (what the orchestrator's moves judge); for a MIG
slice also the Allocate requests per minute for its profile (what warm slices are carved from). One
row per series: the value now, the point and the interval at the horizon, the model. A series
without enough history says so instead (the control plane names what it needs)."""

from __future__ import annotations

from mesh import errors

LOAD_METRICS = (("temperature", "C"), ("memory_used", "bytes"))
DEMAND_HORIZON_S = 600.0


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        from mesh.units import format_size
        return format_size(int(max(0.0, value)))
    if unit == "C":
        return f"{value:.1f}C"
    return f"{value:.2f}"


def _row(mesh, kind: str, name: str, metric: str, unit: str, horizon: float) -> dict:
    step = max(1.0, horizon / 15) if horizon < 3600 else horizon / 30
    try:
        f = mesh.get_forecast(kind, name, metric, horizon, step_seconds=step)
    except errors.MeshError as e:
        return {"series": f"{kind}/{name}", "metric": metric, "horizon_seconds": horizon, "error": str(e)}
    p = f.points[-1]
    return {"series": f"{kind}/{name}", "metric": metric, "horizon_seconds": horizon, "unit": unit,
            "now": f.last_value, "point": p.value, "lo": p.lo, "hi": p.hi, "level": f.level, "model": f.model}


def for_gpus(mesh, node: str, indexes, horizon: float) -> list[dict]:
    return [_row(mesh, "gpu", f"{node}/{i}", metric, unit, horizon) for i in indexes for metric, unit in LOAD_METRICS]


def for_slice(mesh, d: dict, horizon: float) -> list[dict]:
    rows = for_gpus(mesh, d["node"], [d["gpu_index"]], horizon) if d.get("node") else []
    if d.get("profile"):
        rows.append(_row(mesh, "fleet", f"profile/{d['profile']}", "requests", "", max(horizon, DEMAND_HORIZON_S)))
    return rows


def section(rows: list[dict]) -> str:
    from tools.meshctl.output import render_table
    if not rows:
        return ""
    table = []
    for r in rows:
        h = f"+{r['horizon_seconds']:g}s"
        if "error" in r:
            msg = r["error"].split(": ", 1)[-1]
            table.append([r["series"], r["metric"], "-", h, "-", "-", msg[:90]])
            continue
        u = r["unit"]
        table.append([r["series"], r["metric"], _fmt(r["now"], u), h, _fmt(r["point"], u),
                      f"[{_fmt(r['lo'], u)}, {_fmt(r['hi'], u)}] {r['level']:.0%}", r["model"]])
    text = render_table(["series", "metric", "now", "horizon", "point", "interval", "model"], table)
    return "Forecasts:\n" + "".join(f"  {line}\n" for line in text.rstrip("\n").split("\n"))


def safe(fn, *args) -> list[dict]:
    """The rows, or none when the control plane has no ForecastService (older, or history off)."""
    try:
        return fn(*args)
    except errors.MeshError:
        return []
