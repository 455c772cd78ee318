"""NodeResourcesFit: does the request fit the node's host CPU and memory, and which GPUs (memory,
compute share, MIG placement options, sharing kind) can hold its slices? It enumerates the node's
options: one per distinct GPU state and MIG start slot for a single slice, and for a gang on one
node (or one NVLink domain) one greedy option per NVLink domain and one over the whole node."""

from __future__ import annotations

import functools
from collections import defaultdict

from controlplane.state.fleet import MIB, Fleet, GpuState, NodeEntry
from controlplane.scheduler.framework import SUCCESS, CycleState, Option, Pick, Status
from mesh import gpumodels
from mesh.slicespec import SliceRequest

NAME = "NodeResourcesFit"


class Plugin:
    NAME = NAME
    cacheable = True

    def __init__(self, enforce_host: bool = True) -> None:
        if not isinstance(enforce_host, bool):
            raise ValueError(f"{NAME}: enforce_host must be true or false, not {enforce_host!r}")
        self.enforce_host = enforce_host

    # -- host resources -------------------------------------------------------------

    def filter(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> Status:
        on_node = req.count if req.topology != "any" else 1
        inv = node.record.inventory
        cls = node.gpus[0].model.name if node.gpus else "host"
        if self.enforce_host and req.cpu_milli and inv.cpu_milli and node.cpu_free < req.cpu_milli * on_node:
            return Status.unschedulable(cls, "node:not enough host CPU", NAME)
        if self.enforce_host and req.host_memory_bytes and inv.memory_bytes and \
                node.host_memory_free < req.host_memory_bytes * on_node:
            return Status.unschedulable(cls, "node:not enough host memory", NAME)
        if req.isolation != "host" and not node.gpus:
            return Status.unschedulable(cls, "node:no GPUs", NAME, unresolvable=True)
        return SUCCESS

    # -- GPU options ----------------------------------------------------------------

    def options(self, req: SliceRequest, node: NodeEntry,
                gpus: list[tuple[int, GpuState]]) -> tuple[list[Option], list[tuple[str, str]]]:
        if req.isolation == "host":
            return [(Pick(-1, "host", cpu_milli=req.cpu_milli, host_memory_bytes=req.host_memory_bytes),)], []
        if req.count == 1 or req.topology == "any":
            out, why, last, picks = [], [], None, None
            for rank, g in gpus:
                key = g.state_key()
                if key != last:   # an identical GPU earlier in the order gives the same options
                    last = key
                    picks = fit_one(req, g, rank, g.mig_layout, g.allocated_memory, g.allocated_compute)
                    if not isinstance(picks, str):
                        out.extend((p,) for p in picks)
                if isinstance(picks, str):
                    why.append((g.model.name, picks))
            return out, why
        groups: list[list[tuple[int, GpuState]]] = []
        domains: dict[int, list] = defaultdict(list)
        for rank, g in gpus:
            if g.nvlink_domain >= 0:
                domains[g.nvlink_domain].append((rank, g))
        groups.extend(domains.values())
        if req.topology == "same-node":
            groups.append(gpus)
        out = []
        for grp in groups:
            opt = gang_on(req, grp)
            if opt is not None and opt not in out:
                out.append(opt)
        cls = gpus[0][1].model.name if gpus else "host"
        return out, [(cls, "node:no NVLink domain holds the gang" if req.topology == "same-nvlink" else
                      f"node:cannot hold {req.count} slices")]

    # -- the refusal ------------------------------------------------------------------

    def fleet_reason(self, req: SliceRequest, fleet: Fleet) -> tuple[str, str] | None:
        """When a refused request asks for more memory than any GPU it may use has (of its GPU model(s), in the
        mode its isolation needs, on a schedulable node), why, naming the largest: (class, why). None otherwise
        (the per-GPU reasons say it all). Only worked out for a refusal, so it may look at every GPU."""
        if req.isolation == "host" or req.mig_profile or not req.memory_bytes:
            return None
        models = {req.gpu_model} if req.gpu_model else set(req.gpu_models)
        largest = None
        for node in fleet.nodes.values():
            if not node.schedulable:
                continue
            for g in node.gpus:
                if models and g.model.name not in models:
                    continue
                if g.mig_enabled and req.isolation not in (None, "mig"):
                    continue
                if largest is None or g.memory_bytes > largest.memory_bytes:
                    largest = g
        if largest is None or req.memory_bytes <= largest.memory_bytes:
            return None
        to = f" to {req.isolation} slices" if req.isolation else ""
        return "fleet", (f"no GPU can hold memory_bytes={req.memory_bytes}: the largest GPU memory available{to} "
                         f"is {largest.memory_bytes} bytes ({largest.model.name} on {largest.node})")


def mig_profile(req: SliceRequest, model: gpumodels.GpuModel) -> gpumodels.MigProfile | str:
    if req.mig_profile:
        try:
            return model.profile(req.mig_profile)
        except KeyError:
            return f"no MIG profile {req.mig_profile}"
    p = model.smallest_profile_for(req.memory_bytes, req.compute_share)
    return p if p is not None else "no MIG profile large enough"


def fit_one(req: SliceRequest, g: GpuState, rank: int, layout, allocated_memory: int,
            allocated_compute: float, sharing: str | None = "?") -> list[Pick] | str:
    """The picks of one slice of `req` on `g` in the given state (its own unless a gang is being
    laid out), or the reason there is none."""
    cpu, hmem = req.cpu_milli, req.host_memory_bytes
    if g.mig_enabled:
        if req.isolation not in (None, "mig"):
            return f"GPU is in MIG mode (no {req.isolation})"
        p = mig_profile(req, g.model)
        if isinstance(p, str):
            return p
        starts = g.free_starts(p.name) if layout is g.mig_layout else gpumodels.free_starts(g.model, layout, p.name)
        if not starts:
            return f"no free {p.name} placement"
        share = round(p.compute_slices / gpumodels.MIG_COMPUTE_SLICES, 4)
        return [Pick(rank, "mig", p.name, st, p.memory_slices, p.memory_mib * MIB, share, cpu, hmem) for st in starts]
    if req.isolation == "mig":
        return "MIG mode is disabled"
    if req.memory_bytes > g.memory_bytes:
        # checked first and for every mode: an exclusive slice is given the whole GPU, which must still hold
        # what the request asked for (it used to be placed on any idle GPU, 40 GiB on a 24 GB L4)
        return too_small(req.memory_bytes, g.memory_bytes)
    isolation = req.isolation or "timeshare"
    if sharing == "?":
        sharing = g.sharing
    if sharing == "exclusive" or (isolation == "exclusive" and (sharing is not None or allocated_memory)):
        return "GPU is in use" if isolation == "exclusive" else "GPU held exclusively"
    if sharing is not None and sharing != isolation:
        return f"GPU shared by {sharing}"
    if isolation == "exclusive":
        mem, share = g.memory_bytes, 1.0
    else:
        mem = req.memory_bytes
        share = req.compute_share or (1.0 if isolation == "timeshare" else min(1.0, req.memory_bytes / g.memory_bytes))
    if mem > g.memory_bytes - allocated_memory:
        return f"not enough free memory for memory_bytes={req.memory_bytes}"
    if isolation == "mps" and allocated_compute + share > 1.0 + 1e-9:
        return "MPS compute shares used up"
    return [Pick(rank, isolation, None, None, None, mem, round(share, 4), cpu, hmem)]


def too_small(memory_bytes: int, gpu_memory: int) -> str:
    """The reason a GPU can never hold a slice of `memory_bytes` (the same text for every GPU of one size,
    so the refusal counts them together)."""
    return f"memory_bytes={memory_bytes} is more than the GPU's {gpu_memory} bytes of memory"


def gang_on(req: SliceRequest, gpus: list[tuple[int, GpuState]]) -> Option | None:
    """`req.count` slices over `gpus`, each on the fullest GPU that still holds it (best fit, MIG
    start slot keeping the most room), or None."""
    layouts = {rank: list(g.mig_layout) for rank, g in gpus}
    mem = {rank: g.allocated_memory for rank, g in gpus}
    comp = {rank: g.allocated_compute for rank, g in gpus}
    kind = {rank: g.sharing for rank, g in gpus}
    picks = []
    for _ in range(req.count):
        best, best_fill = None, None
        for rank, g in gpus:
            got = fit_one(req, g, rank, layouts[rank], mem[rank], comp[rank], kind[rank])
            if isinstance(got, str):
                continue
            fill = (sum(g.model.profile(p).memory_slices for p, _ in layouts[rank]) / 8 if g.mig_enabled
                    else mem[rank] / g.memory_bytes)
            if best_fill is None or fill > best_fill:
                best, best_fill = (g, got), fill
        if best is None:
            return None
        g, got = best
        pick = got[0] if len(got) == 1 else max(got, key=lambda p: (room_after(g.model, layouts[p.rank] + [(p.profile, p.start)]), -p.start))
        picks.append(pick)
        mem[pick.rank] += pick.memory_bytes
        comp[pick.rank] += pick.compute_share
        kind[pick.rank] = pick.isolation
        if pick.profile:
            layouts[pick.rank].append((pick.profile, pick.start))
    return tuple(picks)


def room_after(model: gpumodels.GpuModel, layout) -> int:
    """How many placements of any profile remain possible: larger is less fragmented."""
    return _room(model, tuple(sorted(layout)))


@functools.lru_cache(maxsize=65536)
def _room(model: gpumodels.GpuModel, layout: tuple) -> int:
    return sum(len(gpumodels.free_starts(model, layout, p.name)) for p in model.mig_profiles if not p.media_extensions)
