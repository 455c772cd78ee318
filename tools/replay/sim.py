"""The replay protocol of the FGD paper's artifact, driving the control plane's scheduler
(`controlplane.scheduler`, the same code as `Allocate`) over an in-memory fleet.

Arrival mode (the default): pods shuffled by seed arrive one by one, topped up with pods drawn at
random from the same trace until the GPUs asked for reach `load_max` x capacity (or cut there);
no departures; a pod that fits nowhere is skipped. After each pod that crosses a step of arrived
load the curve records unallocated GPUs and fragmented GPUs (the free GPU capacity the trace's
typical pods, those that make up 95% of its GPU pods, cannot use).

Timeline mode: pods are created and deleted at their trace times; the curve is sampled at steps of
elapsed events with `load` = GPUs asked for by live pods / capacity, averaged over seeds point by
point (seeds differ in the node order and the random policy's draws).

Ties between equal scores go to the smallest node name. As in the artifact (which sorts the nodes
by name and prefixes each with its place in a random permutation) the replay prefixes the names so
that this is a random order fixed for the run, seeded (`order="shuffled"`); `file` keeps the list's
order. With `mix_mode="trace"` the planner gets the trace's pod types up front, CPU-only pods
included (the artifact's typical pods include them; the fragmentation metric of the curve does not);
with `"online"` (the default) it learns them from the arrivals as the live control plane does (the
FragmentationGradient plugin's sliding window). The curve's fragmentation metric is always the
trace's mix, so both modes are measured alike.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from controlplane.state.fleet import Fleet
from controlplane.scheduler import profiles
from controlplane.scheduler.framework import Framework
from controlplane.scheduler.plugins import fgd
from controlplane.scheduler.plugins._gpu import free_milli
from gpumesh.v1 import types_pb2
from mesh.slicespec import ISOLATION_ENUM
from controlplane.state.fleet import MIB
from tools.replay.trace import TraceNode, TracePod, build_fleet, request_of

POLICIES = tuple(profiles.PROFILES)


def type_counts(pods: list[TracePod]) -> Counter:
    """How many pods of each type (GPUs, milli-GPU, CPU, models) the trace has; pods without GPUs
    as (0, 0, CPU, models) (the artifact's typical pods include them; a plugin may leave them out)."""
    return Counter(_key(p) for p in pods)


def _key(p: TracePod) -> tuple:
    return fgd.type_of(request_of(p)) if p.num_gpu else (0, 0, p.cpu_milli, frozenset(p.gpu_spec))


def type_memory(pods: list[TracePod]) -> dict:
    """The host memory (bytes) each pod type most often asks for."""
    seen: dict[tuple, Counter] = {}
    for p in pods:
        seen.setdefault(_key(p), Counter())[p.memory_mib * MIB] += 1
    return {k: c.most_common(1)[0][0] for k, c in seen.items()}


def typical_mix(pods: list[TracePod], coverage: float = 0.95) -> list[fgd.MixType]:
    """The pod types that make up `coverage` of the GPU pods (the fragmentation metric's mix)."""
    return fgd.top_types(Counter({k: n for k, n in type_counts(pods).items() if k[0]}), coverage)


NODE_ORDERS = ("shuffled", "file")
MIX_MODES = ("online", "trace")


def node_order(nodes: list[TraceNode], seed: int, order: str = "shuffled") -> list[TraceNode]:
    """The nodes renamed so that name order, which breaks ties between equal scores (the smallest
    name wins), is a random order fixed per run (`shuffled`, seeded), as in the artifact, which sorts
    the nodes by name and prefixes each with its place in a random permutation; or the list's order
    (`file`)."""
    if order not in NODE_ORDERS:
        raise ValueError(f"node order {order!r} is not one of {', '.join(NODE_ORDERS)}")
    out = list(nodes) if order == "file" else sorted(nodes, key=lambda n: n.name)
    if order == "shuffled":
        random.Random(f"nodes-{seed}").shuffle(out)
    return [dataclasses.replace(n, name=f"{i:05d}-{n.name}") for i, n in enumerate(out)]


def fragmented_gpus(fleet: Fleet, plugin: fgd.Plugin) -> float:
    """Fleet fragmentation against the plugin's mix, in GPUs."""
    total = 0.0
    for node in fleet.nodes.values():
        if node.gpus:
            frees = tuple(sorted((free_milli(g) for g in node.gpus), reverse=True))
            cpu = node.cpu_free if node.record.inventory.cpu_milli else float("inf")
            total += plugin.node_frag(node.gpus[0].model.name, cpu, frees)
    return total / 1000


@dataclass
class Run:
    policy: str
    seed: int
    capacity_gpus: int
    curve: list[dict] = field(default_factory=list)
    placed: int = 0
    skipped: int = 0
    decisions: int = 0
    seconds: float = 0.0


class Replay:
    """One policy over one fleet: `arrive(pod)` schedules and binds, `depart(pod)` releases."""

    def __init__(self, nodes: list[TraceNode], policy: str, mix: list[fgd.MixType], seed: int = 0,
                 framework: Framework | None = None, counts: Counter | None = None,
                 order: str = "shuffled", memory: dict | None = None, mix_mode: str = "online") -> None:
        if mix_mode not in MIX_MODES:
            raise ValueError(f"mix mode {mix_mode!r} is not one of {', '.join(MIX_MODES)}")
        self.fleet = build_fleet(node_order(nodes, seed, order))
        args = {"Random": {"seed": seed}}
        self.fw = framework or profiles.build(policy, args=args if policy == "random" else None, preemption=False)
        self.metric = fgd.Plugin(mix=mix)
        try:
            planner = self.fw.plugin(fgd.NAME)
        except KeyError:
            planner = None
        # `trace`: the scheduler knows the trace's mix up front, as in the artifact; `online`: it learns
        # the mix from the requests it sees (its sliding window), as the live control plane does
        if planner is not None and mix_mode == "trace":
            planner.set_counts(counts, memory) if counts else planner.set_mix(mix)
        self.planner = planner
        self.capacity = sum(len(n.gpus) for n in self.fleet.nodes.values())
        self.allocated_milli = 0
        self.by_pod: dict[str, list[str]] = {}
        self._ids = 0

    def arrive(self, pod: TracePod) -> bool:
        req = request_of(pod)
        d = self.fw.schedule(req, self.fleet, allow_preemption=False, explain=False)
        if not d.ok:
            return False
        ids = []
        for c in d.choices:
            self._ids += 1
            s = types_pb2.Slice(id=f"s{self._ids}", allocation_id=pod.name, tenant=req.tenant, node=c.node,
                                gpu_index=c.gpu_index, isolation=ISOLATION_ENUM.get(c.isolation, 0),
                                memory_bytes=c.memory_bytes, compute_share=c.compute_share,
                                cpu_milli=c.cpu_milli, host_memory_bytes=c.host_memory_bytes)
            self.fleet.put_slice(s)
            ids.append(s.id)
        self.by_pod[pod.name] = ids
        self.allocated_milli += int(round(pod.gpu_request * 1000))
        return True

    def depart(self, pod: TracePod) -> None:
        ids = self.by_pod.pop(pod.name, None)
        if ids is None:
            return
        for i in ids:
            self.fleet.drop_slice(i)
        self.allocated_milli -= int(round(pod.gpu_request * 1000))

    def point(self, load: float) -> dict:
        return {"load": round(load, 4), "unallocated_gpus": round(self.capacity - self.allocated_milli / 1000, 3),
                "fragmented_gpus": round(fragmented_gpus(self.fleet, self.metric), 3)}


def arrivals(pods: list[TracePod], capacity: int, seed: int, load_max: float) -> list[TracePod]:
    """The artifact's arrival sequence: shuffled, topped up by random draws, cut at load_max."""
    rng = random.Random(seed)
    seq = list(pods)
    rng.shuffle(seq)
    target = load_max * capacity
    asked = sum(p.gpu_request for p in seq)
    gpu_pods = [p for p in pods if p.num_gpu] or pods
    while asked < target and gpu_pods:
        p = rng.choice(pods)
        seq.append(p)
        asked += p.gpu_request
    out, asked = [], 0.0
    for p in seq:
        if asked >= target - 1e-9:
            break
        out.append(p)
        asked += p.gpu_request
    return out


def run_arrivals(nodes: list[TraceNode], pods: list[TracePod], policy: str, seed: int, load_max: float = 1.3,
                 step: float = 0.01, mix: list[fgd.MixType] | None = None, order: str = "shuffled",
                 mix_mode: str = "online") -> Run:
    mix = mix if mix is not None else typical_mix(pods)
    rp = Replay(nodes, policy, mix, seed, counts=type_counts(pods), order=order, memory=type_memory(pods),
                mix_mode=mix_mode)
    run = Run(policy, seed, rp.capacity)
    seq = arrivals(pods, rp.capacity, seed, load_max)
    t0 = time.perf_counter()
    asked, next_mark = 0.0, step
    run.curve.append(rp.point(0.0))
    for i, pod in enumerate(seq):
        if rp.arrive(pod):
            run.placed += 1
        else:
            run.skipped += 1
        asked += pod.gpu_request
        load = asked / rp.capacity
        if load >= next_mark - 1e-9 or i == len(seq) - 1:
            while next_mark <= load + 1e-9:
                next_mark += step
            run.curve.append(rp.point(load))
    run.decisions = len(seq)
    run.seconds = time.perf_counter() - t0
    return run


def run_timeline(nodes: list[TraceNode], pods: list[TracePod], policy: str, seed: int = 0,
                 points: int = 100, mix: list[fgd.MixType] | None = None, order: str = "shuffled",
                 mix_mode: str = "online") -> Run:
    """Creation and deletion at the trace's times (a pod without a deletion time stays); seeds
    differ in the node order (ties) and in the random policy's draws."""
    mix = mix if mix is not None else typical_mix(pods)
    rp = Replay(nodes, policy, mix, seed, counts=type_counts(pods), order=order, memory=type_memory(pods),
                mix_mode=mix_mode)
    run = Run(policy, seed, rp.capacity)
    events = []
    for i, p in enumerate(pods):
        events.append((p.creation_time, 1, i, p))
        if p.deletion_time and p.deletion_time > p.creation_time:
            events.append((p.deletion_time, 0, i, p))
    events.sort(key=lambda e: e[:3])
    every = max(1, len(events) // points)
    live = 0.0
    t0 = time.perf_counter()
    for n, (_, kind, _, pod) in enumerate(events):
        if kind == 1:
            live += pod.gpu_request
            if rp.arrive(pod):
                run.placed += 1
            else:
                run.skipped += 1
        else:
            live -= pod.gpu_request
            rp.depart(pod)
        if n % every == every - 1:
            run.curve.append(rp.point(live / rp.capacity))
    run.decisions = run.placed + run.skipped
    run.seconds = time.perf_counter() - t0
    return run


def average(runs: list[Run], step: float = 0.01) -> list[dict]:
    """Curves of several seeds averaged at each multiple of `step` of arrived load (each seed's
    first point at or past the mark)."""
    if not runs:
        return []
    top = min(max(p["load"] for p in r.curve) for r in runs)
    out = []
    for k in range(int(top / step + 1e-6) + 1):
        m = k * step
        vals = [at_load(r.curve, m) for r in runs]
        out.append({"load": round(m, 4),
                    "unallocated_gpus": round(sum(v["unallocated_gpus"] for v in vals) / len(vals), 2),
                    "fragmented_gpus": round(sum(v["fragmented_gpus"] for v in vals) / len(vals), 2)})
    return out


def average_timeline(runs: list[Run]) -> list[dict]:
    """Timeline curves of several seeds averaged point by point (every seed samples the same
    events, so the same live load)."""
    if not runs:
        return []
    n = min(len(r.curve) for r in runs)
    out = []
    for i in range(n):
        pts = [r.curve[i] for r in runs]
        out.append({"load": pts[0]["load"],
                    "unallocated_gpus": round(sum(p["unallocated_gpus"] for p in pts) / len(pts), 2),
                    "fragmented_gpus": round(sum(p["fragmented_gpus"] for p in pts) / len(pts), 2)})
    return out


def at_load(curve: list[dict], load: float) -> dict | None:
    """The first point at or past `load`."""
    for p in curve:
        if p["load"] >= load - 1e-9:
            return p
    return curve[-1] if curve else None


def snapshot(nodes: list[types_pb2.Node], slices: list[types_pb2.Slice]) -> Fleet:
    """A fleet from the API's view of a live control plane (ListNodes, ListSlices)."""
    fleet = Fleet()
    for n in nodes:
        entry = fleet.upsert_node(n)
        entry.ready = n.state == types_pb2.NODE_STATE_READY
    for s in slices:
        fleet.put_slice(s)
    return fleet


def decide(framework: Framework, fleet: Fleet, req) -> list:
    """What the scheduler chooses for `req` on `fleet` (the choices Allocate would bind), or []."""
    d = framework.schedule(req, fleet)
    return d.choices if d.ok else []
