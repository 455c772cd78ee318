"""Pressure: prefers GPUs with memory and thermal headroom (a soft score; NodeHealth is the hard
limit). 0 for a pick on a calm GPU, minus one point per level of pressure or heat."""

from __future__ import annotations

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins.nodehealth import PRESSURE, THERMAL
from mesh.slicespec import SliceRequest

NAME = "Pressure"


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self) -> None:
        pass

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        total = 0.0
        for pick in option:
            g = gpu_of(node, pick)
            if g is not None:
                total -= max(0, PRESSURE.index(g.memory_pressure) - 1) + THERMAL.index(g.thermal_state)
        return total / max(1, len(option))
