"""Spread: the emptiest node (most free CPU and GPU after the placement) and, on it, the emptiest
GPU: keeps load and heat apart at the price of fragmentation."""

from __future__ import annotations

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option
from controlplane.scheduler.plugins.bestfit import gpu_fill, leftover
from mesh.slicespec import SliceRequest

NAME = "Spread"


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self) -> None:
        pass

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        return leftover(node, option) - 0.01 * gpu_fill(node, option)
