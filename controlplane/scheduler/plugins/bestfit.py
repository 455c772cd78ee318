"""BestFit: the node left with the least free CPU and GPU (as fractions of its capacity, averaged),
and on it the fullest GPU that holds the slice; MIG start slots that keep the most placements
possible win among equals.

`integer: true` scores as the paper's artifact does: 100 x (1 - (free CPU after / 128 cores +
free GPU after / 8 GPUs) / 2), in whole numbers (near-ties to node order), the fullest GPU inside
the node."""

from __future__ import annotations

import math

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins._gpu import free_milli, pick_milli
from controlplane.scheduler.plugins.noderesources import room_after
from mesh.slicespec import SliceRequest

NAME = "BestFit"
MAX_CPU_MILLI, MAX_GPU_MILLI = 128_000, 8_000   # the artifact's normalizers (its largest node)


class Plugin:
    NAME = NAME
    cacheable = True

    tiebreak = None

    def __init__(self, cpu_weight: float = 1.0, gpu_weight: float = 1.0, integer: bool = False) -> None:
        if not isinstance(integer, bool):
            raise ValueError(f"{NAME}: integer must be true or false, not {integer!r}")
        self.integer = integer
        if integer:
            self.tiebreak = lambda state, req, node, option: gpu_fill(node, option)
        for k, v in (("cpu_weight", cpu_weight), ("gpu_weight", gpu_weight)):
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:   # NaN or inf: NaN scores
                raise ValueError(f"{NAME}: {k} must be a finite number >= 0, not {v!r}")
        self.cpu_weight, self.gpu_weight = float(cpu_weight), float(gpu_weight)

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        if self.integer:
            cpu = node.cpu_free - sum(p.cpu_milli for p in option) if node.record.inventory.cpu_milli else 0
            gpu = sum(free_milli(g) for g in node.gpus)
            gpu -= sum(pick_milli(gpu_of(node, p), p.memory_bytes, p.compute_share, p.isolation) for p in option)
            return float(int((1.0 - (0.5 * cpu / MAX_CPU_MILLI + 0.5 * gpu / MAX_GPU_MILLI)) * 100))
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
