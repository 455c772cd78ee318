"""Preemption: when nothing fits and the request may preempt, find the node where evicting the
fewest allocations of lower priority (lowest priorities first) makes room; for a spread gang
(`topology: any`, `count` > 1) also the fewest victims over the whole fleet, its slices on several
nodes. Returns the placement with its victims, whom the controller evicts (their clients see why)
before binding."""

from __future__ import annotations

from controlplane.state.fleet import Fleet
from gpumesh.v1 import types_pb2

NAME = "Preemption"


class Plugin:
    NAME = NAME

    def __init__(self, enabled: bool = True, max_victims: int = 16) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"{NAME}: enabled must be true or false, not {enabled!r}")
        if not isinstance(max_victims, int) or max_victims < 1:
            raise ValueError(f"{NAME}: max_victims must be a positive integer, not {max_victims!r}")
        self.enabled, self.max_victims = enabled, max_victims

    def post_filter(self, fw, state, req, fleet: Fleet):
        from controlplane.scheduler.framework import SUCCESS, Decision, Reasons, to_choices
        if not self.enabled:
            return None
        best = None
        for node in fleet.nodes.values():
            if not node.schedulable:
                continue
            allocs: dict[str, list[types_pb2.Slice]] = {}
            for g in node.gpus:
                for s in g.slices.values():
                    if s.priority < req.priority and s.allocation_id and s.state != types_pb2.SLICE_STATE_RELEASING:
                        allocs.setdefault(s.allocation_id, []).append(s)
            if not allocs:
                continue
            order = sorted(allocs, key=lambda a: (allocs[a][0].priority, -len(allocs[a]), a))
            removed: list[str] = []
            held: dict[str, list[types_pb2.Slice]] = {}
            try:
                found = None
                for a in order[:self.max_victims]:
                    held[a] = _evict(fleet, a)
                    removed.append(a)
                    found = fw._place_all(state, req, fleet, Reasons(), nodes=[node])
                    if found:
                        break
                if not found:
                    continue
                # reprieve: give back the most important victims that are not needed
                for a in reversed(removed[:-1]):
                    _restore(fleet, held.pop(a))
                    again = fw._place_all(state, req, fleet, Reasons(), nodes=[node])
                    if again:
                        found = again
                    else:
                        held[a] = _evict(fleet, a)
                victims = [a for a in removed if a in held]
                rank = (len(victims), max(allocs[a][0].priority for a in victims), node.name)
                if best is None or rank < best[0]:
                    best = (rank, victims, to_choices(found))
            finally:
                for slices in held.values():
                    _restore(fleet, slices)
        if req.count > 1 and req.topology == "any":
            # a spread gang may need room on several nodes at once
            spread = self._spread(fw, state, req, fleet)
            if spread is not None and (best is None or spread[0] < best[0]):
                best = spread
        if best is None:
            return None
        return Decision(SUCCESS, [], victims=best[1], choices=best[2])

    def _spread(self, fw, state, req, fleet: Fleet):
        """Victims over the whole fleet for a spread gang: evict lower priorities (lowest first,
        larger allocations first among equals) until every slice has a place, then reprieve the
        most important victims that are not needed. Returns (rank, victims, choices) or None."""
        from controlplane.scheduler.framework import Reasons, to_choices
        allocs: dict[str, list[types_pb2.Slice]] = {}
        for node in fleet.nodes.values():
            if not node.schedulable:
                continue
            for g in node.gpus:
                for s in g.slices.values():
                    if s.priority < req.priority and s.allocation_id and s.state != types_pb2.SLICE_STATE_RELEASING:
                        allocs.setdefault(s.allocation_id, []).append(s)
        if not allocs:
            return None
        order = sorted(allocs, key=lambda a: (allocs[a][0].priority, -len(allocs[a]), a))
        removed: list[str] = []
        held: dict[str, list[types_pb2.Slice]] = {}
        try:
            found = None
            for a in order[:self.max_victims]:
                held[a] = _evict(fleet, a)
                removed.append(a)
                found = fw._place_all(state, req, fleet, Reasons())
                if found:
                    break
            if not found:
                return None
            for a in reversed(removed[:-1]):
                _restore(fleet, held.pop(a))
                again = fw._place_all(state, req, fleet, Reasons())
                if again:
                    found = again
                else:
                    held[a] = _evict(fleet, a)
            victims = [a for a in removed if a in held]
            return (len(victims), max(allocs[a][0].priority for a in victims), ""), victims, to_choices(found)
        finally:
            for slices in held.values():
                _restore(fleet, slices)


def _evict(fleet: Fleet, allocation_id: str) -> list[types_pb2.Slice]:
    gone = [s for s in list(fleet.slices.values()) if s.allocation_id == allocation_id]
    for s in gone:
        fleet.drop_slice(s.id)
    return gone


def _restore(fleet: Fleet, slices: list[types_pb2.Slice]) -> None:
    for s in slices:
        fleet.put_slice(s)
