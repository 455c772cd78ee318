"""AntiAffinity: a slice does not go to a node holding a slice of its tenant that carries any of its
anti-affinity label pairs, nor to one where a slice of its tenant has anti-affinity rules that name its own
labels. Rules never reach across tenants: one tenant's rules (or labels) cannot keep another tenant's slices off
a node. A request's `avoid_nodes` (a migration placing its target off the source node) are refused here too: a
per-node verdict, as this plugin's are, that the cached filters cannot give."""

from __future__ import annotations

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import SUCCESS, CycleState, Status
from mesh.slicespec import SliceRequest

NAME = "AntiAffinity"


class Plugin:
    NAME = NAME
    cacheable = False   # depends on the labels of the slices on the node

    def __init__(self) -> None:
        pass

    def relevant(self, req: SliceRequest) -> bool:
        """Only requests with rules or labels can clash (the fleet's rules name labels)."""
        return bool(req.anti_affinity or req.labels or req.avoid_nodes)

    def filter(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> Status:
        if node.name in req.avoid_nodes:
            return Status.unschedulable(node.gpus[0].model.name if node.gpus else "host",
                                        "node:the node the slice moves off", NAME)
        rules = req.anti_affinity
        for g in node.gpus:
            for s in g.slices.values():
                if s.tenant != req.tenant:
                    continue
                if rules and any(s.labels.get(k) == v for k, v in rules.items()):
                    return Status.unschedulable(g.model.name, "node:holds a slice matching anti-affinity", NAME)
                if s.anti_affinity and any(req.labels.get(k) == v for k, v in s.anti_affinity.items()):
                    return Status.unschedulable(g.model.name, "node:a slice there is anti-affine to this one", NAME)
        return SUCCESS
