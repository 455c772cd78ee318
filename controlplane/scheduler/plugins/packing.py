"""Packing: shared slices onto GPUs already in use, then onto idle GPUs of nodes already in use,
then onto idle nodes (the FGD paper's GPU-packing baseline); the fullest such node first.

`integer: true` scores as the paper's artifact does (whole numbers, near-ties to node order):
onto GPUs in use 100 - (free share of the GPUs taken, in %) / 10 (at least 50); onto idle GPUs of a
used node 50 - the idle GPUs taken (at least 33); onto an idle node 33 - its GPUs; a request
without GPUs 0 everywhere. The GPU inside the node is the fullest that holds the slice."""

from __future__ import annotations

import math

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins._gpu import free_milli
from controlplane.scheduler.plugins.bestfit import gpu_fill, leftover
from mesh.slicespec import SliceRequest

NAME = "Packing"


class Plugin:
    NAME = NAME
    cacheable = True
    tiebreak = None

    def __init__(self, used_gpu: float = 2.0, used_node: float = 1.0, node_fill: float = 0.5,
                 cpu_fill: float = 0.0, integer: bool = False) -> None:
        for k, v in (("used_gpu", used_gpu), ("used_node", used_node), ("node_fill", node_fill),
                     ("cpu_fill", cpu_fill)):
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:   # NaN or inf: NaN scores
                raise ValueError(f"{NAME}: {k} must be a finite number >= 0, not {v!r}")
        if not isinstance(integer, bool):
            raise ValueError(f"{NAME}: integer must be true or false, not {integer!r}")
        self.used_gpu, self.used_node, self.node_fill, self.cpu_fill = used_gpu, used_node, node_fill, cpu_fill
        self.integer = integer
        if integer:
            self.tiebreak = fuller

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        if self.integer:
            return float(integer_score(node, option))
        on_used_gpu = any((g := gpu_of(node, p)) is not None and free_milli(g) < 1000 for p in option)
        node_used = any(free_milli(g) < 1000 for g in node.gpus)
        score = self.used_gpu * on_used_gpu + self.used_node * node_used \
            + self.node_fill * (1 - leftover(node, option, 0.0, 1.0)) + 0.01 * gpu_fill(node, option)
        if self.cpu_fill:
            score += self.cpu_fill * (1 - leftover(node, option, 1.0, 0.0))
        return score


def integer_score(node: NodeEntry, option: Option) -> int:
    """The artifact's GPU-packing tiers (0-100)."""
    picked = [g for p in option if (g := gpu_of(node, p)) is not None]
    if not picked:
        return 0
    idle = sum(1 for g in node.gpus if free_milli(g) >= 1000)
    if idle == len(node.gpus):
        return max(33 - idle, idle)
    idle_taken = sum(1 for g in picked if free_milli(g) >= 1000)
    if idle_taken:
        return max(50 - idle_taken, 33)
    free_pct = sum(free_milli(g) * 100 // 1000 for g in picked)
    return max(100 - free_pct // 10, 50)


def fuller(state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
    """Among a node's equal options: the fullest GPUs (the artifact's best-fit GPU choice)."""
    return -sum(free_milli(g) for p in option if (g := gpu_of(node, p)) is not None)
