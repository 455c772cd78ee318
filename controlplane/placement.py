"""MIG-aware best-fit placement over the in-memory fleet.

A pure function of the fleet and the request: it returns where each slice of
the gang goes, or raises ResourceExhausted with the reasons per GPU model.
(The plugin-based scheduler builds on this; here one policy: pack slices onto
the fullest GPU that still fits, and pick the MIG start slot that keeps the
most room for other profiles.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from controlplane.fleet import MIB, Fleet, GpuState, NodeEntry
from mesh import errors, gpumodels
from mesh.slicespec import SliceRequest


@dataclass(frozen=True)
class Choice:
    node: str
    gpu_index: int
    gpu_uuid: str
    gpu_model: str
    isolation: str
    profile: str | None
    start: int | None
    size: int | None
    memory_bytes: int
    compute_share: float


class _Reasons:
    def __init__(self) -> None:
        self.by_class: dict[str, Counter] = defaultdict(Counter)

    def add(self, cls: str, why: str, n: int = 1) -> None:
        self.by_class[cls][why] += n

    def error(self, req: SliceRequest) -> errors.ResourceExhausted:
        reasons = {cls: "; ".join(f"{n} GPU(s): {why}" for why, n in c.most_common())
                   for cls, c in self.by_class.items()}
        if not reasons:
            reasons = {"fleet": "no GPU nodes registered"}
        what = req.mig_profile or f"{req.memory_bytes} bytes ({req.isolation or 'any isolation'})"
        text = f"cannot place {req.count} slice(s) of {what}: " + " | ".join(
            f"{cls}: {r}" for cls, r in sorted(reasons.items()))
        return errors.ResourceExhausted(text, reasons=reasons)


def _room_after(model: gpumodels.GpuModel, layout: list[tuple[str, int]]) -> int:
    """How many placements of any profile remain possible: larger is less fragmented."""
    return sum(len(gpumodels.free_starts(model, layout, p.name))
               for p in model.mig_profiles if not p.media_extensions)


def _mig_profile(g: GpuState, req: SliceRequest, reasons: _Reasons) -> gpumodels.MigProfile | None:
    model = g.model
    if req.mig_profile:
        try:
            return model.profile(req.mig_profile)
        except KeyError:
            reasons.add(model.name, f"no MIG profile {req.mig_profile}")
            return None
    profile = model.smallest_profile_for(req.memory_bytes, req.compute_share)
    if profile is None:
        reasons.add(model.name, "no MIG profile large enough")
    return profile


def _fit_mig(g: GpuState, req: SliceRequest, reasons: _Reasons) -> float | None:
    """Best-fit score of `g` for a MIG slice (most memory slots already used wins), or None."""
    profile = _mig_profile(g, req, reasons)
    if profile is None:
        return None
    if not g.free_starts(profile.name):
        reasons.add(g.model.name, f"no free {profile.name} placement")
        return None
    return g.used_slots


def _mig_choice(g: GpuState, req: SliceRequest) -> Choice:
    """The slice on the winning GPU, at the free start slot that keeps the most placements possible."""
    profile = _mig_profile(g, req, _Reasons())
    starts = g.free_starts(profile.name)
    start = starts[0]
    if len(starts) > 1:
        start = max(starts, key=lambda st: (_room_after(g.model, g.mig_layout + [(profile.name, st)]), -st))
    share = round(profile.compute_slices / gpumodels.MIG_COMPUTE_SLICES, 4)
    return Choice(g.node, g.index, g.uuid, g.model.name, "mig", profile.name, start, profile.memory_slices,
                  profile.memory_mib * MIB, share)


def _shared_amounts(g: GpuState, req: SliceRequest, isolation: str) -> tuple[int, float]:
    if isolation == "exclusive":
        return g.memory_bytes, 1.0
    share = req.compute_share or (1.0 if isolation == "timeshare" else min(1.0, req.memory_bytes / g.memory_bytes))
    return req.memory_bytes, share


def _fit_shared(g: GpuState, req: SliceRequest, isolation: str, reasons: _Reasons) -> float | None:
    sharing = g.sharing
    if sharing == "exclusive" or (isolation == "exclusive" and g.slices):
        reasons.add(g.model.name, "GPU is in use" if isolation == "exclusive" else "GPU held exclusively")
        return None
    if sharing is not None and sharing != isolation:
        reasons.add(g.model.name, f"GPU shared by {sharing}")
        return None
    mem, share = _shared_amounts(g, req, isolation)
    if mem > g.memory_bytes - g.allocated_memory:
        reasons.add(g.model.name, "not enough free memory")
        return None
    if isolation == "mps" and g.allocated_compute + share > 1.0 + 1e-9:
        reasons.add(g.model.name, "MPS compute shares used up")
        return None
    return (g.allocated_memory + mem) / g.memory_bytes * 10


def fit_gpu(g: GpuState, req: SliceRequest, reasons: _Reasons) -> float | None:
    """The score of `g` for one slice of `req` (higher is better), or None with a reason."""
    if req.gpu_model and g.model.name != req.gpu_model:
        reasons.add(g.model.name, f"model is not {req.gpu_model}")
        return None
    if g.mig_enabled:
        if req.isolation not in (None, "mig"):
            reasons.add(g.model.name, f"GPU is in MIG mode (no {req.isolation})")
            return None
        return _fit_mig(g, req, reasons)
    if req.isolation == "mig":
        reasons.add(g.model.name, "MIG mode is disabled")
        return None
    return _fit_shared(g, req, req.isolation or "timeshare", reasons)


def make_choice(g: GpuState, req: SliceRequest) -> Choice:
    if g.mig_enabled:
        return _mig_choice(g, req)
    isolation = req.isolation or "timeshare"
    mem, share = _shared_amounts(g, req, isolation)
    return Choice(g.node, g.index, g.uuid, g.model.name, isolation, None, None, None, mem, round(share, 4))


def _nodes(fleet: Fleet, reasons: _Reasons) -> list[NodeEntry]:
    out = []
    for n in fleet.nodes.values():
        if not n.ready:
            for g in n.gpus:
                reasons.add(g.model.name, "node not ready")
        elif n.record.cordoned:
            for g in n.gpus:
                reasons.add(g.model.name, "node cordoned")
        else:
            out.append(n)
    return out


def _best(gpus, req: SliceRequest, reasons: _Reasons) -> Choice | None:
    best, best_score = None, None
    for g in gpus:
        score = fit_gpu(g, req, reasons)
        if score is not None and (best_score is None or score > best_score):
            best_score, best = score, g
    return make_choice(best, req) if best is not None else None


def _assume(fleet: Fleet, c: Choice, tag: str):
    """Mark `c` taken in the fleet (a placeholder slice), so the next slice of the gang sees it."""
    from gpumesh.v1 import types_pb2
    from mesh.slicespec import ISOLATION_ENUM
    s = types_pb2.Slice(id=tag, node=c.node, gpu_index=c.gpu_index, isolation=ISOLATION_ENUM[c.isolation],
                        profile=c.profile or "", memory_bytes=c.memory_bytes, compute_share=c.compute_share)
    if c.profile:
        s.placement.start, s.placement.size = c.start, c.size
    fleet.gpu(c.node, c.gpu_index).add(s)
    return s


def _best_fullest_first(fleet: Fleet, req: SliceRequest, reasons: _Reasons) -> Choice | None:
    """Best fit over the whole fleet, scanning fill levels from the fullest and stopping at the
    first level that fits (lower levels cannot score higher). Falls back to a full scan, for
    the reasons, only when nothing fits."""
    nodes = fleet.nodes
    quiet = _Reasons()
    for gpus in fleet.index.fullest_first():
        best, best_score = None, None
        for g in gpus:
            if not nodes[g.node].schedulable:
                continue
            score = fit_gpu(g, req, quiet)
            if score is not None and (best_score is None or score > best_score):
                best_score, best = score, g
        if best is not None:
            return make_choice(best, req)
    _best((g for n in _nodes(fleet, reasons) for g in n.gpus), req, reasons)
    return None


def _place_group(fleet: Fleet, gpus_of, req: SliceRequest, reasons: _Reasons) -> list[Choice] | None:
    chosen: list[Choice] = []
    tags = []
    try:
        for i in range(req.count):
            attempt = _Reasons()
            c = _best(gpus_of(), req, attempt) if gpus_of else _best_fullest_first(fleet, req, attempt)
            if c is None:
                for cls, counter in attempt.by_class.items():
                    reasons.by_class[cls].update(counter)
                return None
            chosen.append(c)
            tags.append((c, f"__assume-{i}"))
            _assume(fleet, c, f"__assume-{i}")
        return chosen
    finally:
        for c, tag in tags:
            fleet.gpu(c.node, c.gpu_index).remove(tag)


def place(fleet: Fleet, req: SliceRequest) -> list[Choice]:
    """Where each of the `req.count` slices goes; all or nothing."""
    reasons = _Reasons()
    if req.topology == "any":
        result = _place_group(fleet, None, req, reasons)
        if result is not None:
            return result
        raise reasons.error(req)
    nodes = _nodes(fleet, reasons)
    groups = []
    for n in nodes:
        if req.topology == "same-node":
            groups.append(n.gpus)
        else:
            domains: dict[int, list[GpuState]] = defaultdict(list)
            for g in n.gpus:
                if g.nvlink_domain >= 0:
                    domains[g.nvlink_domain].append(g)
            groups.extend(domains.values())
    # Prefer the fullest group that fits, so gangs do not scatter empty nodes.
    groups.sort(key=lambda gs: -sum(g.allocated_memory for g in gs))
    for gpus in groups:
        result = _place_group(fleet, lambda gpus=gpus: iter(gpus), req, reasons)
        if result is not None:
            return result
    if not groups:
        reasons.add("fleet", "no node or NVLink domain to hold the gang")
    raise reasons.error(req)
