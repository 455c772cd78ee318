"""FragmentationGradient (after FGD, Weng et al., USENIX ATC '23): choose the node, GPU and start
slot that least increase the fleet's fragmentation, measured against the expected mix of requests.

A node's fragmentation for one request type is the free GPU capacity that type cannot use there:
all of it when the type cannot run on the node at all (model, host CPU, with `host_memory` host
memory, too few GPUs with room), else the free capacity of the GPUs too small for it; a type that
takes no GPU (`cpu_types`, as the artifact counts CPU pods) counts all free GPU capacity. The node's
fragmentation is the mix-weighted sum; the score of an option is minus its increase, in GPUs
(`integer: true` scores as the paper's artifact does, int(100 * sigmoid(-delta_milli / scale)),
which leaves near-ties to node order; `quantum` instead floors -delta to whole steps of that many
milli-GPUs). Among a node's options with equal scores, `gpu_choice` picks the GPU: `fullest` (the
artifact's lowest index, which it fills first), `exact` (the exact gradient, then MIG start slots
that keep the most room) or `canonical` (the first in the node's canonical order).

The mix is learned from the requests the scheduler sees (`_mix.MixLearner`: a sliding window of
`window` requests, recomputed every `refresh`, and with `warm` at every doubling while the window
fills; the types that make up `coverage` of it; weights by share of all requests, or of the kept
types with `normalize`) unless set explicitly (`meshctl sim --mix trace` sets the trace's mix, as
the artifact does).
"""

from __future__ import annotations

import math
from collections import Counter

from controlplane.state.fleet import NodeEntry
from controlplane.scheduler.framework import CycleState, Option, gpu_of
from controlplane.scheduler.plugins._gpu import free_milli, pick_milli
from controlplane.scheduler.plugins._mix import MixLearner, MixType, top_types, type_of
from controlplane.scheduler.plugins.noderesources import room_after
from mesh.slicespec import SliceRequest

NAME = "FragmentationGradient"
WEIGHTINGS = ("count", "demand", "gangs")
GPU_CHOICES = ("canonical", "fullest", "exact")


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self, integer: bool = False, window: int = 2000, coverage: float = 0.95,
                 refresh: int = 200, mix: list[MixType] | None = None, weighting: str = "count",
                 demand_power: float = 1.0, per_gpu: bool = False, tolerance: float = 0.1,
                 host_in_types: bool = True, cpu_types: bool = False, normalize: bool = False,
                 gpu_choice: str = "canonical", scale: float = 1000.0, quantum: float = 0.0,
                 host_memory: bool = False, warm: bool = True) -> None:
        if not isinstance(host_memory, bool):
            raise ValueError(f"{NAME}: host_memory must be true or false, not {host_memory!r}")
        # a type that does not find its host memory on a node cannot use the node's GPUs either
        self.host_memory = host_memory
        if not isinstance(quantum, (int, float)) or not 0 <= quantum < math.inf:
            raise ValueError(f"{NAME}: quantum must be a finite number >= 0, not {quantum!r}")
        self.quantum = float(quantum)
        if not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"{NAME}: scale must be a finite number > 0, not {scale!r}")
        self.scale = float(scale)
        for k, v in (("cpu_types", cpu_types), ("normalize", normalize)):
            if not isinstance(v, bool):
                raise ValueError(f"{NAME}: {k} must be true or false, not {v!r}")
        if gpu_choice not in GPU_CHOICES:
            raise ValueError(f"{NAME}: gpu_choice {gpu_choice!r} is not one of {', '.join(GPU_CHOICES)}")
        self.cpu_types, self.normalize = cpu_types, normalize
        # among a node's options with equal scores: the fullest GPU (the artifact's lowest GPU
        # index, which it fills first) or the first in the node's canonical order
        self.tiebreak = {"fullest": self._fuller, "exact": self._exact}.get(gpu_choice)
        if not isinstance(host_in_types, bool):
            raise ValueError(f"{NAME}: host_in_types must be true or false, not {host_in_types!r}")
        self.host_in_types = host_in_types
        if not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 2:
            raise ValueError(f"{NAME}: tolerance must be in [0, 2], not {tolerance!r}")
        self.tolerance = float(tolerance)
        if not isinstance(per_gpu, bool):
            raise ValueError(f"{NAME}: per_gpu must be true or false, not {per_gpu!r}")
        self.per_gpu = per_gpu
        if weighting not in WEIGHTINGS:
            raise ValueError(f"{NAME}: weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not isinstance(demand_power, (int, float)) or not 0 <= demand_power <= 2:
            raise ValueError(f"{NAME}: demand_power must be in [0, 2], not {demand_power!r}")
        self.weighting, self.demand_power = weighting, float(demand_power)
        if not isinstance(integer, bool):
            raise ValueError(f"{NAME}: integer must be true or false, not {integer!r}")
        try:
            self.learner = MixLearner(window, refresh, coverage, normalize, host_memory, warm)
        except ValueError as exc:
            raise ValueError(f"{NAME}: {exc}") from None
        self.integer, self.coverage, self.refresh = integer, float(coverage), refresh
        self.fixed = mix is not None
        self.mix: list[MixType] = self._weigh(mix or [MixType(1, 1000)])
        self._frag: dict = {}
        self._base: dict = {}   # node signature id -> (free milli per GPU, free CPU, fragmentation)
        self.on_change = None   # the framework's invalidate, set by the profile builder

    # -- the mix ---------------------------------------------------------------------

    def _weigh(self, mix: list[MixType]) -> list[MixType]:
        """By request count (the paper), or by GPUs asked for (`demand`: a type's weight grows with
        the GPUs each request takes, to the power `demand_power`), keeping the total weight."""
        if self.weighting == "count":
            return list(mix)
        if self.weighting == "gangs":   # a gang of k whole GPUs counts k times
            raw = [m.weight * (m.gpus if m.gpus > 1 else 1) ** self.demand_power for m in mix]
        else:
            raw = [m.weight * (m.gpus * m.milli / 1000) ** self.demand_power for m in mix]
        scale = sum(m.weight for m in mix) / (sum(raw) or 1)
        return [MixType(m.gpus, m.milli, m.cpu_milli, m.models, w * scale, m.memory) for m, w in zip(mix, raw)]

    def set_counts(self, counts: Counter, memory: dict | None = None) -> None:
        """Fix the mix to these request-type counts (the replay: the trace's), under this plugin's
        coverage and weighting; `memory`: the host memory each type typically takes."""
        if not self.cpu_types:   # host-only request types (no GPUs) out of the mix
            counts = Counter({k: n for k, n in counts.items() if k[0]})
        if not self.host_in_types:
            merged: Counter = Counter()
            for k, n in counts.items():
                merged[(k[0], k[1], 0, k[3])] += n
            counts = merged
        mix = top_types(counts, self.coverage, self.normalize)
        if self.host_memory and memory:
            mix = [MixType(m.gpus, m.milli, m.cpu_milli, m.models, m.weight,
                           memory.get((m.gpus, m.milli, m.cpu_milli, m.models), 0)) for m in mix]
        self.set_mix(mix)

    def set_mix(self, mix: list[MixType]) -> None:
        self.mix, self.fixed = self._weigh(mix), True
        self._frag.clear()
        self._base.clear()
        if self.on_change:
            self.on_change()

    def observe(self, req: SliceRequest) -> None:
        """Learn the mix from the requests seen (`MixLearner`); a new mix is taken when it drifts past
        `tolerance` from the one in use, or at a warm-start step."""
        key = type_of(req)
        if key is None and self.cpu_types and req.isolation == "host":
            key = (0, 0, req.cpu_milli, frozenset())
        if key is None or self.fixed:
            return
        if not self.host_in_types:
            key = (key[0], key[1], 0, key[3])
        mem = req.host_memory_bytes * (req.count if req.topology != "any" else 1) if self.host_memory else 0
        learned = self.learner.add(key, mem)
        if learned is None:
            return
        mix = self._weigh(learned.mix)
        if learned.force or drift(self.mix, mix) > self.tolerance:   # re-scores every node: not for noise
            self.mix = mix
            self._frag.clear()
            self._base.clear()
            if self.on_change:
                self.on_change()

    # -- fragmentation ---------------------------------------------------------------

    def node_frag(self, model: str, cpu_free: float, frees: tuple[int, ...], mem_free: float = math.inf) -> float:
        """Mix-weighted free milli-GPUs the mix cannot use on a node with these free GPUs."""
        key = (model, cpu_free, frees, mem_free)
        got = self._frag.get(key)
        if got is None:
            got = frag_of(self.mix, model, cpu_free, frees, mem_free)
            if len(self._frag) > 500_000:
                self._frag.clear()
            self._frag[key] = got
        return got

    def delta(self, node: NodeEntry, option: Option) -> float:
        """How much `option` raises the node's fragmentation, in milli-GPUs."""
        gpus = node.gpus
        if not gpus:
            return 0.0
        order = node.gpu_order()
        sid = node.sid or node.signature_id()
        base = self._base.get(sid)   # the node before: shared by all of its options
        if base is None:
            frees0 = [free_milli(gpus[i]) for i in order]
            cpu0 = node.cpu_free if node.record.inventory.cpu_milli else math.inf
            mem0 = node.host_memory_free if self.host_memory and node.record.inventory.memory_bytes else math.inf
            base = (frees0, cpu0, self.node_frag(gpus[0].model.name, cpu0, tuple(sorted(frees0, reverse=True)), mem0),
                    mem0)
            if len(self._base) > 100_000:
                self._base.clear()
            self._base[sid] = base
        frees, cpu, before, mem = list(base[0]), base[1], base[2], base[3]
        model = gpus[0].model.name
        for p in option:
            if p.rank >= 0:
                g = gpus[order[p.rank]]
                frees[p.rank] = max(0, frees[p.rank] - pick_milli(g, p.memory_bytes, p.compute_share, p.isolation))
            cpu -= p.cpu_milli
            mem -= p.host_memory_bytes
        after = self.node_frag(model, cpu, tuple(sorted(frees, reverse=True)), mem)
        return after - before

    def _exact(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        """The exact gradient, then MIG start slots that keep the most placements possible."""
        room = 0
        for p in option:
            if p.profile and (g := gpu_of(node, p)) is not None:
                room += room_after(g.model, g.mig_layout + [(p.profile, p.start)])
        return -self.delta(node, option) + 1e-4 * room

    def _fuller(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        return -sum(free_milli(g) for p in option if (g := gpu_of(node, p)) is not None)

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        d = self.delta(node, option)
        if self.per_gpu:   # per GPU asked for, so other scores weigh the same for small and large requests
            key = type_of(req)
            d = d * 1000 / max(1, key[0] * key[1]) if key else d
        if self.quantum:   # whole steps of `quantum` milli-GPUs: near-ties to node order, no saturation
            return float(math.floor(-d / self.quantum))
        if self.integer:
            return float(int(100 / (1 + math.exp(min(700.0, d / self.scale)))))
        return -d / 1000


def drift(a: list[MixType], b: list[MixType]) -> float:
    """Total variation between two mixes (0: same, 2: disjoint)."""
    wa = {(m.gpus, m.milli, m.cpu_milli, m.models, m.memory): m.weight for m in a}
    wb = {(m.gpus, m.milli, m.cpu_milli, m.models, m.memory): m.weight for m in b}
    return sum(abs(wa.get(k, 0.0) - wb.get(k, 0.0)) for k in wa.keys() | wb.keys())


def frag_of(mix: list[MixType], model: str, cpu_free: float, frees: tuple[int, ...],
            mem_free: float = math.inf) -> float:
    """`frees` sorted largest first."""
    total = sum(frees)
    if not total:
        return 0.0
    out = 0.0
    for t in mix:
        if not t.gpus:   # a host-only type uses no GPU: all free GPU is fragment to it (the artifact's XL/XR)
            out += t.weight * total
            continue
        if (t.models and model not in t.models) or cpu_free < t.cpu_milli or mem_free < t.memory:
            out += t.weight * total
            continue
        m = t.milli
        if t.gpus == 1:
            if frees[0] < m:
                out += t.weight * total
            else:
                out += t.weight * sum(f for f in frees if f < m)
        else:
            if len(frees) < t.gpus or frees[t.gpus - 1] < m:
                out += t.weight * total
            else:
                out += t.weight * sum(f for f in frees if f < m)
    return out
