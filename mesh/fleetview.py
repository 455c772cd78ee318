"""What the fleet views draw, computed once for `meshctl top` and the web view.

Pure functions over the SDK's dicts (`gpu_status_to_dict`, `slice_to_dict`, `deployment_to_dict`):

* `gpu_slots`: a GPU's 8 memory slots and 7 compute slices and who holds each. On a MIG GPU a GPU
  instance of profile P placed at start slot S holds memory slots S..S+P.memory_slices-1 and is drawn on
  compute slices S..S+P.compute_slices-1 (clipped to 7): NVML names the memory placement; the compute
  slices follow the same start, which is how `nvidia-smi mig -lgi` lays them out for every profile of
  DESIGN.md's table. An instance of the layout that no visible slice holds (a warm, pre-carved
  instance, or another tenant's slice hidden from a tenant's token) is drawn as carved but unnamed. On
  a GPU shared by MPS or time-share the slots are filled in proportion to each slice's memory and
  compute share.
* `level`: one word for a GPU's condition (ok, warm, hot, critical, unhealthy) from the memory
  pressure, thermal state and health the control plane derived, for colours.
* `tenant_symbols`: a stable one-letter symbol per tenant, for the terminal's slot cells.
"""

from __future__ import annotations

import string
from typing import Any, Iterable

from mesh.gpumodels import MIG_COMPUTE_SLICES, MIG_MEMORY_SLOTS, get_model

Cell = dict[str, Any] | None

# The worst of these wins; the words are the CSS classes and the terminal's colour keys.
LEVELS = ("ok", "warm", "hot", "critical", "unhealthy")
_PRESSURE = {"low": "ok", "normal": "ok", "high": "hot", "critical": "critical"}
_THERMAL = {"normal": "ok", "warning": "warm", "throttling": "hot", "critical": "critical"}
_HEALTH = {"healthy": "ok"}          # anything else (degraded, quarantined, unhealthy, ...) is unhealthy


def _profile_shape(model: str, profile: str) -> tuple[int, int] | None:
    """(memory slices, compute slices) of `profile` on `model`, None when either is unknown."""
    try:
        p = get_model(model).profile(profile)
    except (KeyError, ValueError):
        return None
    return p.memory_slices, p.compute_slices


def _parse_layout(entry: str) -> tuple[str, int] | None:
    profile, _, start = entry.rpartition("@")
    try:
        return profile, int(start)
    except ValueError:
        return None


def gpu_slots(gpu: dict, slices: Iterable[dict]) -> dict[str, list[Cell]]:
    """{"memory": 8 cells, "compute": 7 cells}; a cell is None (free) or {profile, start, slice, tenant,
    share} where slice/tenant are "" for a carved instance no visible slice holds."""
    memory: list[Cell] = [None] * MIG_MEMORY_SLOTS
    compute: list[Cell] = [None] * MIG_COMPUTE_SLICES
    mine = [s for s in slices if s.get("node") == gpu.get("node") and s.get("gpu_index") == gpu.get("index")]
    layout = [p for p in (_parse_layout(e) for e in gpu.get("mig_layout") or ()) if p is not None]
    if layout or any(s.get("profile") for s in mine):
        by_place = {(s.get("profile"), (s.get("placement") or {}).get("start")): s for s in mine if s.get("profile")}
        places = dict.fromkeys(layout)
        for key in by_place:                           # a slice the layout does not list yet (being carved)
            if key[1] is not None:
                places.setdefault(key)
        for profile, start in places:
            shape = _profile_shape(gpu.get("model", ""), profile)
            if shape is None:
                continue
            s = by_place.get((profile, start)) or {}
            cell = {"profile": profile, "start": start, "slice": s.get("id", ""), "tenant": s.get("tenant", ""),
                    "state": s.get("state", "")}
            for i in range(start, min(start + shape[0], MIG_MEMORY_SLOTS)):
                memory[i] = cell
            for i in range(start, min(start + shape[1], MIG_COMPUTE_SLICES)):
                compute[i] = cell
        return {"memory": memory, "compute": compute}
    total = gpu.get("memory_total_bytes") or 0
    _fill(memory, mine, lambda s: (s.get("memory_bytes") or 0) / total if total else 0.0)
    _fill(compute, mine, lambda s: s.get("compute_share") or 0.0)
    return {"memory": memory, "compute": compute}


def _fill(cells: list[Cell], slices: list[dict], share) -> None:
    """Fill `cells` left to right, each slice taking round(share * len) cells (at least one)."""
    at = 0
    for s in sorted(slices, key=lambda s: s.get("id", "")):
        n = max(1, round(share(s) * len(cells)))
        cell = {"profile": s.get("isolation", ""), "start": at, "slice": s.get("id", ""),
                "tenant": s.get("tenant", ""), "state": s.get("state", "")}
        for i in range(at, min(at + n, len(cells))):
            cells[i] = cell
        at += n


def level(gpu: dict) -> str:
    """The worst of the GPU's memory pressure, thermal state and health, as one of LEVELS."""
    found = ["ok"]
    if gpu.get("memory_pressure"):
        found.append(_PRESSURE.get(gpu["memory_pressure"], "ok"))
    if gpu.get("thermal_state"):
        found.append(_THERMAL.get(gpu["thermal_state"], "ok"))
    if gpu.get("health"):
        found.append(_HEALTH.get(gpu["health"], "unhealthy"))
    return max(found, key=LEVELS.index)


SYMBOLS = string.ascii_uppercase + string.ascii_lowercase + string.digits


def tenant_symbols(tenants: Iterable[str]) -> dict[str, str]:
    """tenant -> one character, by sorted name (the 63rd tenant on share "+")."""
    out = {}
    for i, t in enumerate(sorted({t for t in tenants if t})):
        out[t] = SYMBOLS[i] if i < len(SYMBOLS) else "+"
    return out


def node_rows(gpus: Iterable[dict]) -> dict[str, list[dict]]:
    """GPUs grouped by node, nodes and GPUs in order."""
    out: dict[str, list[dict]] = {}
    for g in sorted(gpus, key=lambda g: (g.get("node", ""), g.get("index", 0))):
        out.setdefault(g.get("node", ""), []).append(g)
    return out


__all__ = ["gpu_slots", "level", "tenant_symbols", "node_rows", "LEVELS", "SYMBOLS"]
