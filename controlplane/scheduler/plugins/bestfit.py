"""BestFit: the node left with the least free CPU and GPU (as fractions of its capacity, averaged),
and on it the fullest GPU that holds the slice; MIG start slots that keep the most placements
possible win among equals."""

from __future__ import annotations

from controlplane.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins._gpu import free_milli, pick_milli
from controlplane.scheduler.plugins.noderesources import room_after
from mesh.slicespec import SliceRequest

NAME = "BestFit"


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self, cpu_weight: float = 1.0, gpu_weight: float = 1.0) -> None:
        for k, v in (("cpu_weight", cpu_weight), ("gpu_weight", gpu_weight)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{NAME}: {k} must be a number >= 0, not {v!r}")
        self.cpu_weight, self.gpu_weight = float(cpu_weight), float(gpu_weight)

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        return -leftover(node, option, self.cpu_weight, self.gpu_weight) + 0.01 * gpu_fill(node, option)


def leftover(node: NodeEntry, option: Option, cpu_weight: float = 1.0, gpu_weight: float = 1.0) -> float:
    """Free share of the node after `option`, 0 (full) to 1 (empty), weighted over CPU and GPU."""
    parts, weights = 0.0, 0.0
    cap = node.record.inventory.cpu_milli
    if cap and cpu_weight:
        used = sum(p.cpu_milli for p in option)
        parts += cpu_weight * (node.cpu_free - used) / cap
        weights += cpu_weight
    if node.gpus and gpu_weight:
        free = sum(free_milli(g) for g in node.gpus)
        free -= sum(pick_milli(gpu_of(node, p), p.memory_bytes, p.compute_share, p.isolation) for p in option)
        parts += gpu_weight * free / (1000 * len(node.gpus))
        weights += gpu_weight
    return parts / weights if weights else 0.0


def gpu_fill(node: NodeEntry, option: Option) -> float:
    """How full the picked GPUs are already (0-1), plus a sliver for MIG start slots that keep room."""
    total = 0.0
    for p in option:
        g = gpu_of(node, p)
        if g is None:
            continue
        total += 1 - free_milli(g) / 1000
        if p.profile:
            total += 0.001 * room_after(g.model, g.mig_layout + [(p.profile, p.start)])
    return total / max(1, len(option))
