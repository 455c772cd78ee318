"""Packing: shared slices onto GPUs already in use, then onto idle GPUs of nodes already in use,
then onto idle nodes (the FGD paper's GPU-packing baseline); the fullest such node first."""

from __future__ import annotations

from controlplane.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins._gpu import free_milli
from controlplane.scheduler.plugins.bestfit import gpu_fill, leftover
from mesh.slicespec import SliceRequest

NAME = "Packing"


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self, used_gpu: float = 2.0, used_node: float = 1.0, node_fill: float = 0.5,
                 cpu_fill: float = 0.0) -> None:
        for k, v in (("used_gpu", used_gpu), ("used_node", used_node), ("node_fill", node_fill),
                     ("cpu_fill", cpu_fill)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{NAME}: {k} must be a number >= 0, not {v!r}")
        self.used_gpu, self.used_node, self.node_fill, self.cpu_fill = used_gpu, used_node, node_fill, cpu_fill

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        on_used_gpu = any((g := gpu_of(node, p)) is not None and free_milli(g) < 1000 for p in option)
        node_used = any(free_milli(g) < 1000 for g in node.gpus)
        score = self.used_gpu * on_used_gpu + self.used_node * node_used \
            + self.node_fill * (1 - leftover(node, option, 0.0, 1.0)) + 0.01 * gpu_fill(node, option)
        if self.cpu_fill:
            score += self.cpu_fill * (1 - leftover(node, option, 1.0, 0.0))
        return score
