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

    def __init__(self) -> None:
        pass

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        on_used_gpu = any((g := gpu_of(node, p)) is not None and free_milli(g) < 1000 for p in option)
        node_used = any(free_milli(g) < 1000 for g in node.gpus)
        return 2.0 * on_used_gpu + 1.0 * node_used + 0.5 * (1 - leftover(node, option, 0.0, 1.0)) \
            + 0.01 * gpu_fill(node, option)
