"""The scheduling framework: profiles and the cycle (statuses and plugin protocols are in
`controlplane.scheduler.types`, re-exported here).

One cycle places one request (`count` slices, all or nothing) on the in-memory
fleet (`controlplane.state.fleet.Fleet`, the snapshot). Per node it runs the filter
plugins, asks the fit plugin for the node's options (which GPUs, which MIG start
slots), scores each option with the weighted score plugins and keeps the best;
the best node wins (ties: the smallest node name, as in the FGD artifact's kube-scheduler, so the
choice does not depend on the order nodes registered in, on the leader or a follower). "Does not fit" is a
`Status` with reasons, never an exception.

Speed: plugins marked `cacheable` depend only on the node's signature (its
schedulable state, GPUs in canonical order) and the request's shape, so their
verdict for a (signature, request) pair is computed once and reused by every
node with the same signature until something on it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from controlplane.state.fleet import Fleet, NodeEntry
from controlplane.scheduler.types import (  # noqa: F401  (re-exported: plugins import them from here)
    Choice, Code, CycleState, Decision, FilterPlugin, GpuFilterPlugin, NormalizePlugin, Option, OptionsPlugin, Pick, Placement, PostFilterPlugin, PreFilterPlugin, Reasons, ReservePlugin, SUCCESS, ScorePlugin, Status, gpu_of, to_choices)
from mesh.slicespec import SliceRequest

POOL_LABEL = "gpumesh.pool"   # mesh/pools.py LABEL: the Pool plugin's GPU filter depends on it


@dataclass(frozen=True)
class _NodeVerdict:
    status: Status
    option: Option | None = None
    scores: tuple[float, ...] = ()   # the cacheable score plugins' raw scores of `option`
    total: float = 0.0               # their weighted sum
    ok: bool = False


# -- profile and framework ----------------------------------------------------------------

@dataclass
class Profile:
    """Which plugins run, with which score weights (from configuration: see profiles.py)."""

    name: str
    plugins: list[Any]
    weights: dict[str, float] = field(default_factory=dict)

    def of(self, proto) -> list[Any]:
        return [p for p in self.plugins if isinstance(p, proto)]


class Framework:
    CACHE_LIMIT = 200_000

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.pre_filters = [p for p in profile.of(PreFilterPlugin) if hasattr(p, "pre_filter")]
        filters = [p for p in profile.of(FilterPlugin) if hasattr(p, "filter")]
        self.cached_filters = [p for p in filters if p.cacheable]
        self.node_filters = [p for p in filters if not p.cacheable]
        self.gpu_filters = [p for p in profile.plugins if hasattr(p, "filter_gpu")]
        fits = [p for p in profile.plugins if hasattr(p, "options")]
        if len(fits) != 1:
            raise ValueError(f"profile {profile.name}: needs exactly one plugin that enumerates options, "
                             f"has {[p.NAME for p in fits]}")
        self.fit = fits[0]
        scorers = [p for p in profile.plugins if hasattr(p, "score")]
        for p in scorers:
            if p.NAME not in profile.weights:
                profile.weights[p.NAME] = 1.0
        self.cached_scorers = [(p, profile.weights[p.NAME]) for p in scorers if p.cacheable and profile.weights[p.NAME]]
        self.node_scorers = [(p, profile.weights[p.NAME]) for p in scorers
                             if not p.cacheable and profile.weights[p.NAME]]
        self.normalizers = [(i, p) for i, (p, _) in enumerate(self.node_scorers) if hasattr(p, "normalize")]
        # cacheable scores that also rank a node's own options among equal totals (which GPU)
        self.tiebreakers = [p for p, _ in self.cached_scorers if getattr(p, "tiebreak", None) is not None]
        # a lone uniform-random score with nothing else to weigh: one draw instead of a score per node
        self.picker = (self.node_scorers[0][0] if len(self.node_scorers) == 1 and not self.cached_scorers
                       and hasattr(self.node_scorers[0][0], "pick") else None)
        self.reservers = [p for p in profile.plugins if hasattr(p, "reserve")]
        self.post_filters = [p for p in profile.plugins if hasattr(p, "post_filter")]
        self.permits = [p for p in profile.plugins if hasattr(p, "permit")]
        self.observers = [p for p in profile.plugins if hasattr(p, "observe")]
        for p in profile.plugins:
            if hasattr(p, "on_change"):
                p.on_change = self.invalidate
        self.cache: dict[tuple, dict[int, _NodeVerdict]] = {}   # request key -> signature id -> verdict
        self.cached = 0
        self.version = 0   # bumped when a plugin's cached answers go stale (e.g. a new request mix)
        self._names: list[str] = []
        self._name_set: frozenset = frozenset()
        self._names_of: dict | None = None
        self._in_order = False
        self._checks = 0

    def invalidate(self) -> None:
        self.cache.clear()
        self.cached = 0
        self.version += 1

    def by_name(self, fleet: Fleet):
        """The fleet's nodes in name order (ties between equal scores go to the first). The order is
        worked out again only when the set of names changes; when the fleet already holds its nodes
        in name order (the usual case: loaded from etcd, or built so) they are used as they are."""
        nodes = fleet.nodes
        # nodes are seldom removed (a follower drops deleted ones): a new count re-sorts at once,
        # one node exchanged for another at the same count within 64 decisions (the full
        # comparison of names costs about 0.1 ms at 6,000 nodes, too much for every decision)
        self._checks += 1
        if self._names_of is not nodes or len(self._names) != len(nodes) or (
                self._checks % 64 == 0 and nodes.keys() != self._name_set):
            self._names = sorted(nodes)
            self._name_set = frozenset(self._names)
            self._names_of = nodes
            self._in_order = list(nodes) == self._names
        if self._in_order:
            return nodes.values()
        try:
            return [nodes[n] for n in self._names]
        except KeyError:   # a node was taken out
            self._names_of = None
            return self.by_name(fleet)

    def plugin(self, name: str) -> Any:
        for p in self.profile.plugins:
            if p.NAME == name:
                return p
        raise KeyError(name)

    # -- one node --------------------------------------------------------------------

    def _verdict(self, state: CycleState, req: SliceRequest, rkey: tuple, node: NodeEntry) -> _NodeVerdict:
        sub = self.cache.get(rkey)
        if sub is None:
            if self.cached >= self.CACHE_LIMIT:
                self.cache.clear()
                self.cached = 0
            sub = self.cache[rkey] = {}
        sid = node.sid or node.signature_id()
        v = sub.get(sid)
        if v is None:
            v = sub[sid] = self._evaluate(state, req, node)
            self.cached += 1
        return v

    def _evaluate(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> _NodeVerdict:
        for f in self.cached_filters:
            st = f.filter(state, req, node)
            if not st.ok:
                return _NodeVerdict(st)
        gpus, reasons = [], []
        pin = req.only_gpu
        for rank, i in enumerate(node.gpu_order()):
            g = node.gpus[i]
            if pin is not None and g.index != pin[1]:
                continue            # pinned to another GPU of the node (`_find_pinned`: never cached)
            for f in self.gpu_filters:
                why = f.filter_gpu(req, g)
                if why is not None:
                    reasons.append((g.model.name, why))
                    break
            else:
                gpus.append((rank, g))
        options, why = self.fit.options(req, node, gpus)
        if not options:
            reasons.extend(why)
            if not reasons:
                reasons.append((node.gpus[0].model.name if node.gpus else "host", "node:does not fit"))
            return _NodeVerdict(Status(Code.UNSCHEDULABLE, tuple(reasons), self.fit.NAME))
        best, best_tb = None, 0.0
        for opt in options:
            scores = tuple(p.score(state, req, node, opt) for p, _ in self.cached_scorers)
            total = sum(s * w for s, (_, w) in zip(scores, self.cached_scorers))
            if best is not None and total == best.total and self.tiebreakers:
                # equal totals: the GPU choice inside the node (the artifact's allocateGpuId step),
                # never weighed against other nodes
                tb = sum(p.tiebreak(state, req, node, opt) for p in self.tiebreakers)
                if tb > best_tb:
                    best, best_tb = _NodeVerdict(SUCCESS, opt, scores, total, True), tb
            elif best is None or total > best.total:
                best = _NodeVerdict(SUCCESS, opt, scores, total, True)
                if self.tiebreakers and len(options) > 1:
                    best_tb = sum(p.tiebreak(state, req, node, opt) for p in self.tiebreakers)
        return best

    def node_options(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> list[Option]:
        """All of the node's options (uncached), after the GPU filters."""
        gpus = [(rank, node.gpus[i]) for rank, i in enumerate(node.gpu_order())
                if all(f.filter_gpu(req, node.gpus[i]) is None for f in self.gpu_filters)]
        return self.fit.options(req, node, gpus)[0]

    def evaluate_node(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> _NodeVerdict:
        for f in self.relevant_node_filters(req):
            st = f.filter(state, req, node)
            if not st.ok:
                return _NodeVerdict(st)
        return self._verdict(state, req, request_key(req, self.version), node)

    # -- the cycle -------------------------------------------------------------------

    def relevant_node_filters(self, req: SliceRequest) -> list:
        return [f for f in self.node_filters if not hasattr(f, "relevant") or f.relevant(req)]

    def find(self, state: CycleState, req: SliceRequest, fleet: Fleet,
             nodes: Iterable[NodeEntry] | None = None, reasons: Reasons | None = None) -> Placement | None:
        """The best node and option for the request (one node's share of it), or None; when None
        and `reasons` is given, the reasons per node class."""
        if req.only_gpu is not None:
            return self._find_pinned(state, req, fleet, nodes, reasons)
        rkey = request_key(req, self.version)
        node_filters, node_scorers = self.relevant_node_filters(req), self.node_scorers
        nodes = self.by_name(fleet) if nodes is None else sorted(nodes, key=lambda n: n.name)
        self._verdict(state, req, rkey, next(iter(nodes))) if nodes else None   # makes the sub-cache
        sub = self.cache[rkey] if nodes else {}
        best_node, best_v, best_total = None, None, None
        if not node_filters and not node_scorers:
            # the hot path: one int-keyed lookup per node
            for node in nodes:
                v = sub.get(node.sid or node.signature_id())
                if v is None:
                    v = self._verdict(state, req, rkey, node)
                if v.ok and (best_total is None or v.total > best_total):   # in name order: ties to the first
                    best_node, best_v, best_total = node, v, v.total
        else:
            feasible = []
            for node in nodes:
                if node_filters and not all(f.filter(state, req, node).ok for f in node_filters):
                    continue
                v = sub.get(node.sid or node.signature_id())
                if v is None:
                    v = self._verdict(state, req, rkey, node)
                if v.ok:
                    feasible.append((node, v))
            if feasible and self.picker is not None:
                best_node, best_v = feasible[self.picker.pick(len(feasible))]
                options = self.node_options(state, req, best_node)
                if len(options) > 1:   # and a random one of its options
                    return Placement(best_node, options[self.picker.pick(len(options))])
            elif feasible and node_scorers:
                columns = [[p.score(state, req, n, v.option) for n, v in feasible] for p, _ in node_scorers]
                for i, p in self.normalizers:
                    columns[i] = p.normalize(columns[i])
                for j, (n, v) in enumerate(feasible):
                    total = v.total + sum(col[j] * w for col, (_, w) in zip(columns, node_scorers))
                    if best_total is None or total > best_total:
                        best_node, best_v, best_total = n, v, total
            else:
                for n, v in feasible:
                    if best_total is None or v.total > best_total:
                        best_node, best_v, best_total = n, v, v.total
        if best_node is None:
            if reasons is not None:
                self._explain(state, req, rkey, nodes, node_filters, reasons)
            return None
        return Placement(best_node, best_v.option)

    def _find_pinned(self, state: CycleState, req: SliceRequest, fleet: Fleet, nodes: Iterable[NodeEntry] | None,
                     reasons: Reasons | None) -> Placement | None:
        """A request pinned to one GPU (`only_gpu`, a move to the GPU a recommendation listed): that GPU's node alone,
        judged without the verdict cache (a cached verdict serves every node of one signature, and the pin names
        one node's GPU), with the same filters, fit and scores as any request."""
        name, index = req.only_gpu
        node = fleet.nodes.get(name)
        if node is not None and nodes is not None and not any(n is node for n in nodes):
            node = None
        if node is None or not any(g.index == index for g in node.gpus):
            if reasons is not None:
                cls = node.gpus[0].model.name if node is not None and node.gpus else "fleet"
                reasons.add_status(Status.unschedulable(cls, f"node:no GPU {name}/{index}"))
            return None
        v = None
        for f in self.relevant_node_filters(req):
            st = f.filter(state, req, node)
            if not st.ok:
                v = _NodeVerdict(st)
                break
        if v is None:
            v = self._evaluate(state, req, node)
        if not v.ok:
            if reasons is not None:
                reasons.add_status(v.status)
            return None
        return Placement(node, v.option)

    def _explain(self, state, req, rkey, nodes, node_filters, reasons: Reasons) -> None:
        for node in nodes:
            for f in node_filters:
                st = f.filter(state, req, node)
                if not st.ok:
                    reasons.add_status(st)
                    break
            else:
                reasons.add_status(self._verdict(state, req, rkey, node).status)

    def schedule(self, req: SliceRequest, fleet: Fleet, allow_preemption: bool = True,
                 explain: bool = True) -> Decision:
        """Place all `req.count` slices or none; the fleet is left as it was (the caller binds).
        `explain=False` skips collecting the reasons of a refusal (the replay does not show them)."""
        state = CycleState()
        for p in self.observers:
            p.observe(req)
        for p in self.pre_filters:
            st = p.pre_filter(state, req, fleet)
            if not st.ok:
                return Decision(st, reasons=dict(st.reasons))
        reasons = Reasons() if explain else None
        placements = self._place_all(state, req, fleet, reasons)
        if placements is not None:
            return self._permit(state, req, fleet, Decision(SUCCESS, placements))
        if allow_preemption and req.preempt:
            for p in self.post_filters:
                d = p.post_filter(self, state, req, fleet)
                if d is not None and d.ok:
                    return self._permit(state, req, fleet, d)
        summary = reasons.summary() if reasons else {}
        why = self.fit.fleet_reason(req, fleet) if reasons is not None and hasattr(self.fit, "fleet_reason") else None
        if why is not None:   # nothing in the fleet is large enough: say so, with the largest there is
            summary[why[0]] = why[1]
            return Decision(Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (why,), self.fit.NAME), reasons=summary)
        return Decision(Status(Code.UNSCHEDULABLE, (), self.fit.NAME), reasons=summary)

    def _permit(self, state: CycleState, req: SliceRequest, fleet: Fleet, d: Decision) -> Decision:
        """The decision, unless a permit plugin (the tenant's quota, on what the chosen slices really take)
        refuses it."""
        for p in self.permits:
            st = p.permit(state, req, fleet, d.choices, d.victims)
            if not st.ok:
                return Decision(st, reasons=dict(st.reasons))
        return d

    def _place_all(self, state: CycleState, req: SliceRequest, fleet: Fleet, reasons: Reasons | None,
                   nodes: Iterable[NodeEntry] | None = None) -> list[Placement] | None:
        """Node-local requests (one slice, host-only, or a same-node/NVLink gang) take one cycle;
        a spread gang takes one cycle per slice, each seeing the ones before it assumed."""
        if req.count == 1 or req.topology != "any":
            pl = self.find(state, req, fleet, nodes, reasons)
            if pl is None or not self.reserve(state, req, pl):
                return None
            self.unreserve(state, req, pl)
            return [pl]
        one = req.one()
        done: list[Placement] = []
        tags: list[list[str]] = []
        try:
            for i in range(req.count):
                pl = self.find(state, one, fleet, nodes, reasons)
                if pl is None:
                    return None
                tags.append(assume(fleet, pl, f"__assume-{i}", one))
                done.append(pl)
            return done
        finally:
            for t in tags:
                forget(fleet, t)

    def reserve(self, state: CycleState, req: SliceRequest, pl: Placement) -> bool:
        done = []
        for p in self.reservers:
            st = p.reserve(state, req, pl.node, pl.option)
            if not st.ok:
                for q in reversed(done):
                    q.unreserve(state, req, pl.node, pl.option)
                return False
            done.append(p)
        return True

    def unreserve(self, state: CycleState, req: SliceRequest, pl: Placement) -> None:
        for p in reversed(self.reservers):
            p.unreserve(state, req, pl.node, pl.option)


def request_key(req: SliceRequest, version: int) -> tuple:
    """The request's shape: every field a cacheable plugin may look at."""
    return (req.memory_bytes, req.compute_share, req.isolation, req.gpu_model, req.gpu_models, req.mig_profile,
            req.count, req.topology, req.cpu_milli, req.host_memory_bytes, req.labels.get(POOL_LABEL), version)


def assume(fleet: Fleet, pl: Placement, tag: str, req: SliceRequest | None = None) -> list[str]:
    """Mark a placement taken in the fleet with placeholder slices (so the next cycle sees it);
    returns their ids for `forget`. With `req`, they carry its tenant, labels and anti-affinity rules
    as the bound slices will, so the next slice of a spread gang honours anti-affinity to them."""
    from gpumesh.v1 import types_pb2
    from mesh.slicespec import ISOLATION_ENUM
    ids = []
    for j, (pick, g) in enumerate(zip(pl.option, pl.gpus)):
        s = types_pb2.Slice(id=f"{tag}-{j}", node=pl.node.name, gpu_index=g.index if g else -1,
                            isolation=ISOLATION_ENUM.get(pick.isolation, 0), profile=pick.profile or "",
                            memory_bytes=pick.memory_bytes, compute_share=pick.compute_share,
                            cpu_milli=pick.cpu_milli, host_memory_bytes=pick.host_memory_bytes)
        if req is not None:
            s.tenant = req.tenant
            s.labels.update(req.labels)
            s.anti_affinity.update(req.anti_affinity)
        if pick.profile:
            s.placement.start, s.placement.size = pick.start, pick.size
        fleet.put_slice(s)
        ids.append(s.id)
    return ids


def forget(fleet: Fleet, ids: list[str]) -> None:
    for i in ids:
        fleet.drop_slice(i)
