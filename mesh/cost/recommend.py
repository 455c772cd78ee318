"""Consolidation recommendations (seed 002) over a fleet described in plain facts: no I/O, so a synthetic fleet
tests every rule and the control plane (controlplane/cost/recommender.py) only gathers the facts and applies.

Rules, each with the saving per day at the configured prices and the risk (the peak it was sized for):
- `resize`: a replica whose measured peak (sequences in flight over the observation window) needs less
  memory than its slice holds: the smallest MIG profile, or MPS share, that holds the need at that peak;
- `idle-replica`: a READY replica that served no request over the window, of a deployment with another
  READY replica: scale the deployment down by one;
- `idle-warm`: a warm slice nobody claimed: release it;
- `share-mps`: deployments whose replicas each hold a whole GPU (exclusive, or the full MIG profile) and
  whose needs fit one GPU together: redeploy them with MPS isolation on one GPU;
- `pack`: a GPU of MPS/time-share slices whose slices fit in the free memory of other GPUs of the same
  model and isolation: migrating them frees the whole GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh import gpumodels

GIB = 2**30
KINDS = ("resize", "idle-replica", "idle-warm", "share-mps", "pack")


@dataclass(frozen=True)
class ReplicaFacts:
    deployment: str
    replica: str
    slice_id: str
    node: str
    gpu_index: int
    gpu_model: str
    isolation: str               # mig | mps | timeshare | exclusive
    profile: str
    memory_bytes: int            # the slice's
    share: float                 # of its GPU (mesh.cost.slice_share)
    gpu_price: float             # dollars per GPU-hour
    sized_concurrency: int       # sequences the slice was sized for
    need_bytes: int              # the VRAM need at that concurrency
    peak_in_flight: float        # measured over the window (requests running + waiting)
    peak_need_bytes: int         # the VRAM need at max(1, ceil(peak_in_flight))
    observed_seconds: float      # how long the peak was measured for
    ready: bool = True
    idle: bool = False           # no request over the whole window
    ready_peers: int = 0         # other READY replicas of its deployment
    tenant: str = ""             # its deployment's: MPS shares faults and memory, so only one tenant's pair


@dataclass(frozen=True)
class WarmSlice:
    slice_id: str
    node: str
    gpu_model: str
    share: float
    gpu_price: float
    idle_seconds: float


@dataclass(frozen=True)
class GpuFacts:
    node: str
    index: int
    gpu_model: str
    memory_bytes: int
    gpu_price: float
    isolation: str               # of its slices ("" when free)
    slices: tuple = ()           # ((slice_id, memory_bytes, workload_id), ...)
    allocated_bytes: int = 0


@dataclass
class Rec:
    kind: str
    saving_per_day: float
    action: str
    risk: str
    deployment: str = ""
    replica: str = ""
    slice_id: str = ""
    node: str = ""
    target: str = ""
    memory_bytes: int = 0        # resize: the new memory
    compute_share: float = 0.0
    profile: str = ""
    moves: list = field(default_factory=list)   # pack: [(slice_id, workload_id, to_node, to_gpu_index)]
    gpu_index: int = 0           # pack: the GPU it frees (on `node`)


def gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _span(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h"


def resize(r: ReplicaFacts, min_observed: float) -> Rec | None:
    if not r.ready or r.observed_seconds < min_observed or r.peak_need_bytes >= r.memory_bytes:
        return None
    try:
        model = gpumodels.get_model(r.gpu_model)
    except KeyError:
        return None
    gpu_bytes = model.memory_mib * 2**20
    risk = (f"sized for {r.sized_concurrency} sequence(s) ({gib(r.need_bytes)}); measured peak "
            f"{r.peak_in_flight:g} in flight over {_span(r.observed_seconds)} ({gib(r.peak_need_bytes)})")
    if r.isolation == "mig":
        p = model.smallest_profile_for(r.peak_need_bytes, 0.0)
        if p is None or p.name == r.profile or p.memory_slices / 8 >= r.share:
            return None
        new_share = p.memory_slices / 8
        return Rec("resize", (r.share - new_share) * r.gpu_price * 24, f"resize slice to MIG {p.name}", risk,
                   r.deployment, r.replica, r.slice_id, r.node, p.name, profile=p.name)
    if r.isolation in ("mps", "timeshare"):
        new_share = min(1.0, r.peak_need_bytes / gpu_bytes)
        if new_share >= r.share - 1e-6:
            return None
        return Rec("resize", (r.share - new_share) * r.gpu_price * 24,
                   f"resize slice to {gib(r.peak_need_bytes)} ({new_share:.3f} of the GPU)", risk, r.deployment,
                   r.replica, r.slice_id, r.node, gib(r.peak_need_bytes), memory_bytes=r.peak_need_bytes,
                   compute_share=round(new_share, 6) if r.isolation == "mps" else 0.0)
    return None


def idle_replica(r: ReplicaFacts, min_observed: float) -> Rec | None:
    if not (r.ready and r.idle and r.ready_peers >= 1 and r.observed_seconds >= min_observed):
        return None
    return Rec("idle-replica", r.share * r.gpu_price * 24, f"scale deployment {r.deployment} down by one",
               f"no request over {_span(r.observed_seconds)}; {r.ready_peers} other READY replica(s) remain",
               r.deployment, r.replica, r.slice_id, r.node, "replicas - 1")


def idle_warm(w: WarmSlice, min_observed: float) -> Rec | None:
    if w.idle_seconds < min_observed:
        return None
    return Rec("idle-warm", w.share * w.gpu_price * 24, "release the warm slice",
               f"unclaimed for {_span(w.idle_seconds)}; a request of its size waits for a new slice",
               slice_id=w.slice_id, node=w.node)


def share_mps(replicas: list[ReplicaFacts]) -> list[Rec]:
    """Pairs of deployments whose replicas each hold a whole GPU and whose needs fit one GPU of the model."""
    whole = [r for r in replicas if r.ready and r.share >= 0.999]
    out, used = [], set()
    whole.sort(key=lambda r: r.need_bytes)
    for i, a in enumerate(whole):
        if a.replica in used:
            continue
        for b in whole[i + 1:]:
            if b.replica in used or b.deployment == a.deployment or b.gpu_model != a.gpu_model \
                    or b.tenant != a.tenant:
                continue
            try:
                gpu_bytes = gpumodels.get_model(a.gpu_model).memory_mib * 2**20
            except KeyError:
                continue
            if a.peak_need_bytes + b.peak_need_bytes <= gpu_bytes:
                used.update((a.replica, b.replica))
                out.append(Rec("share-mps", min(a.gpu_price, b.gpu_price) * 24,
                               f"run {a.deployment} and {b.deployment} on one GPU by MPS (isolation mps)",
                               f"together {gib(a.peak_need_bytes + b.peak_need_bytes)} of {gib(gpu_bytes)} at their "
                               f"measured peaks; MPS shares faults and memory bandwidth", a.deployment, a.replica,
                               a.slice_id, a.node, f"{b.deployment}/{b.replica}"))
                break
    return out


def pack(gpus: list[GpuFacts], max_sources: int = 64) -> list[Rec]:
    """GPUs of shared slices that can be emptied into the free memory of others of the same model and kind. The
    least-filled GPUs of each (model, kind) are tried as sources, at most `max_sources` of them (a large fleet
    stays quick: the next run finds the next ones). A GPU with a slice whose workload cannot be migrated (its
    workload ID given as "": none, or a model server) cannot be emptied by migrations: it is not a source."""
    out = []
    free = {(g.node, g.index): g.memory_bytes - g.allocated_bytes for g in gpus}
    groups: dict[tuple[str, str], list[GpuFacts]] = {}
    for g in gpus:
        if g.isolation in ("mps", "timeshare") and g.slices:
            groups.setdefault((g.gpu_model, g.isolation), []).append(g)
    for members in groups.values():
        emptied: set = set()
        receiving: set = set()
        members.sort(key=lambda g: (g.allocated_bytes, g.node, g.index))
        for g in members[:max_sources]:
            me = (g.node, g.index)
            if me in receiving or not all(wid for _, _, wid in g.slices):
                continue            # it took slices of an emptied GPU, or holds a slice no migration moves: it stays
            targets = sorted((t for t in members if (t.node, t.index) != me and (t.node, t.index) not in emptied),
                             key=lambda t: free[(t.node, t.index)])      # best fit
            moves, taken = [], {}
            for sid, mem, wid in sorted(g.slices, key=lambda s: -s[1]):
                dest = next((t for t in targets
                             if free[(t.node, t.index)] - taken.get((t.node, t.index), 0) >= mem), None)
                if dest is None:
                    moves = None
                    break
                taken[(dest.node, dest.index)] = taken.get((dest.node, dest.index), 0) + mem
                moves.append((sid, wid, dest.node, dest.index))
            if not moves:
                continue
            for k, v in taken.items():
                free[k] -= v
                receiving.add(k)
            emptied.add(me)
            out.append(pack_rec(g, moves))
    return out


def pack_rec(g: GpuFacts, moves: list) -> Rec:
    """The pack recommendation that empties GPU `g` by `moves` [(slice_id, workload_id, to_node, to_index)]."""
    return Rec("pack", g.gpu_price * 24, f"migrate {len(moves)} slice(s) off GPU {g.node}/{g.index} to free it",
               f"the receiving GPUs hold {gib(sum(s[1] for s in g.slices))} more; their memory pressure rises",
               node=g.node, target=", ".join(f"{s[0]}->{s[2]}/{s[3]}" for s in moves), moves=moves,
               gpu_index=g.index)


def recommend(replicas: list[ReplicaFacts], warm: list[WarmSlice], gpus: list[GpuFacts],
              min_observed: float = 3600.0, kinds: tuple[str, ...] = ()) -> list[Rec]:
    """Every recommendation, highest saving first within each kind, kinds in KINDS order."""
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kinds: {k!r} is not one of {', '.join(KINDS)}")
    want = set(kinds or KINDS)
    out: list[Rec] = []
    if "resize" in want:
        out += sorted(filter(None, (resize(r, min_observed) for r in replicas)), key=lambda x: -x.saving_per_day)
    if "idle-replica" in want:
        recs, per_dep = [], {}
        for r in replicas:
            rec = idle_replica(r, min_observed)
            # never the last READY replica: at most ready_peers removals per deployment
            if rec is not None and per_dep.get(r.deployment, 0) < r.ready_peers:
                per_dep[r.deployment] = per_dep.get(r.deployment, 0) + 1
                recs.append(rec)
        out += sorted(recs, key=lambda x: -x.saving_per_day)
    if "idle-warm" in want:
        out += sorted(filter(None, (idle_warm(w, min_observed) for w in warm)), key=lambda x: -x.saving_per_day)
    if "share-mps" in want:
        out += share_mps(replicas)
    if "pack" in want:
        out += pack(gpus)
    return out
