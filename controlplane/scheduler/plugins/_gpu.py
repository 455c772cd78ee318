"""Shared arithmetic of the plugins: what one GPU can still give, in milli-GPUs."""

from __future__ import annotations

from controlplane.state.fleet import GpuState
from mesh import gpumodels


def free_milli(g: GpuState) -> int:
    """Unallocated share of the GPU in milli-GPUs (0-1000): free MIG memory slots, or the smaller of
    free memory and (MPS) free compute; 0 when held exclusively."""
    got = g.derived.get("free_milli")
    if got is None:
        got = g.derived["free_milli"] = _free_milli(g)
    return got


def _free_milli(g: GpuState) -> int:
    if g.mig_enabled:
        return (gpumodels.MIG_MEMORY_SLOTS - g.used_slots) * 1000 // gpumodels.MIG_MEMORY_SLOTS
    if g.slices and g.sharing == "exclusive":
        return 0
    mem = (g.memory_bytes - g.allocated_memory) * 1000 // max(1, g.memory_bytes)
    if g.sharing == "mps":
        mem = min(mem, int(round((1.0 - g.allocated_compute) * 1000)))
    return max(0, mem)


def pick_milli(g: GpuState | None, memory_bytes: int, compute_share: float, isolation: str) -> int:
    """How many milli-GPUs a pick takes from `g`."""
    if g is None:
        return 0
    if isolation == "exclusive":
        return 1000
    if isolation == "mig":
        return 0 if not g.memory_bytes else -(-memory_bytes * 1000 // g.memory_bytes)
    mem = -(-memory_bytes * 1000 // max(1, g.memory_bytes))
    if isolation == "mps":
        return max(mem, int(round(compute_share * 1000)))
    return mem
