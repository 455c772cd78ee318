"""Topology: a gang's slices in one NVLink domain, and under one IB/RDMA NIC (rail) where the
node reports NIC-to-GPU affinity; 1 point for each, 0 for a single slice that has no peers."""

from __future__ import annotations

import math

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from mesh.slicespec import SliceRequest

NAME = "Topology"


class Plugin:
    NAME = NAME
    cacheable = True   # NVLink domains and NIC affinity are in the node's signature

    def __init__(self, nvlink_weight: float = 1.0, rail_weight: float = 1.0) -> None:
        for k, v in (("nvlink_weight", nvlink_weight), ("rail_weight", rail_weight)):
            if not isinstance(v, (int, float)) or not 0 <= v < math.inf:   # NaN or inf: NaN scores
                raise ValueError(f"{NAME}: {k} must be a finite number >= 0, not {v!r}")
        self.nvlink_weight, self.rail_weight = float(nvlink_weight), float(rail_weight)

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        gpus = {g.index: g for p in option if (g := gpu_of(node, p)) is not None}
        if len(gpus) < 2:
            return 0.0
        score = 0.0
        domains = {g.nvlink_domain for g in gpus.values()}
        if len(domains) == 1 and -1 not in domains:
            score += self.nvlink_weight
        rails = [set(n.gpus) for n in node.record.inventory.nics if n.kind in ("infiniband", "")]
        if any(set(gpus) <= r for r in rails):
            score += self.rail_weight
        return score
