"""One GPU in the control plane's fleet view (`GpuState`): what it has promised to slices, its MIG layout, and
the health and pressure judged from its telemetry; and the `FillIndex` that buckets GPUs by how full they are,
so best fit scans the fullest first.

A GPU's derived values (its `state_key`, the scheduler's cached free capacity) are dropped whenever a watched
field changes, together with its node's signature (`controlplane.state.nodeentry`). `controlplane.state.fleet`
holds the GPUs through their nodes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpumesh.v1 import types_pb2

from mesh import gpumodels

if TYPE_CHECKING:
    from controlplane.state.nodeentry import NodeEntry

ISOLATION_NAMES = {
    types_pb2.ISOLATION_MIG: "mig",
    types_pb2.ISOLATION_MPS: "mps",
    types_pb2.ISOLATION_TIMESHARE: "timeshare",
    types_pb2.ISOLATION_EXCLUSIVE: "exclusive",
}


@functools.lru_cache(maxsize=None)
def _smallest_profile(model: gpumodels.GpuModel) -> str:
    return min(model.mig_profiles, key=lambda p: (p.memory_slices, p.compute_slices, p.media_extensions)).name


@dataclass
class GpuState:
    node: str
    index: int
    uuid: str
    model: gpumodels.GpuModel
    mig_enabled: bool
    memory_bytes: int
    nvlink_domain: int
    slices: dict[str, types_pb2.Slice] = field(default_factory=dict)
    mig_layout: list[tuple[str, int]] = field(default_factory=list)
    allocated_memory: int = 0
    allocated_compute: float = 0.0
    _free: dict[str, list[int]] = field(default_factory=dict)   # profile -> free starts (cache)
    _used_slots: int = 0
    fill_index: "FillIndex | None" = None
    bucket: int = 0
    # Derived from the agent's telemetry (controlplane/controllers/telemetry.py); the scheduler reads them.
    memory_pressure: str = "low"        # low | normal | high | critical
    thermal_state: str = "normal"       # normal | warning | throttling | critical
    health: str = "healthy"             # healthy | unhealthy | lost | quarantined (controlplane/controllers/health.py)
    telemetry: types_pb2.GpuTelemetry | None = None
    owner: "NodeEntry | None" = field(default=None, repr=False, compare=False)
    # values derived from the state above (state_key, the scheduler's free capacity), dropped on change
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name in _GPU_WATCHED:
            self.__dict__["derived"] = {}
            owner = self.__dict__.get("owner")
            if owner is not None:
                owner._sig = owner.sid = None

    def state_key(self) -> tuple:
        """Everything the scheduler's cacheable plugins look at (equal keys: interchangeable GPUs)."""
        key = self.derived.get("key")
        if key is None:
            key = self.derived["key"] = self._state_key()
        return key

    def _state_key(self) -> tuple:
        return (self.model.name, self.mig_enabled, self.memory_bytes, self.allocated_memory,
                round(self.allocated_compute, 6), self.sharing, tuple(sorted(self.mig_layout)), self.nvlink_domain,
                self.health, self.memory_pressure, self.thermal_state)

    @property
    def fill(self) -> int:
        """How full the GPU is, 0-10 (best fit looks at the fullest GPUs first); -1 when it
        cannot take any slice at all (skipped by the scan)."""
        if self.mig_enabled:
            # nothing fits when the smallest profile (fewest memory and compute slices) does not
            if self.mig_layout and not self.free_starts(_smallest_profile(self.model)):
                return -1
            return self._used_slots * 10 // gpumodels.MIG_MEMORY_SLOTS
        if self.allocated_memory >= self.memory_bytes or self.sharing == "exclusive":
            return -1
        return min(10, self.allocated_memory * 10 // max(1, self.memory_bytes))

    def _reindex(self) -> None:
        self.derived = {}
        owner = self.owner
        if owner is not None:
            owner._sig = owner.sid = None
        if self.fill_index is not None:
            self.fill_index.move(self)

    @property
    def sharing(self) -> str | None:
        """The isolation of the slices on this GPU (one kind at a time), None when free."""
        for s in self.slices.values():
            return ISOLATION_NAMES.get(s.isolation)
        return None

    @property
    def used_slots(self) -> int:
        return self._used_slots

    def free_starts(self, profile: str) -> list[int]:
        """Start slots where `profile` fits now (cached until the layout changes)."""
        got = self._free.get(profile)
        if got is None:
            got = self._free[profile] = gpumodels.free_starts(self.model, self.mig_layout, profile)
        return got

    def _layout_changed(self) -> None:
        self._free.clear()
        self._used_slots = sum(self.model.profile(p).memory_slices for p, _ in self.mig_layout)

    def add(self, s: types_pb2.Slice) -> None:
        if s.id in self.slices:
            self.remove(s.id)
        self.slices[s.id] = s
        self.allocated_memory += s.memory_bytes
        self.allocated_compute += s.compute_share
        if s.isolation == types_pb2.ISOLATION_MIG and s.profile:
            self.mig_layout.append((s.profile, s.placement.start))
            self._layout_changed()
        self._reindex()

    def remove(self, slice_id: str) -> None:
        s = self.slices.pop(slice_id, None)
        if s is None:
            return
        self.allocated_memory -= s.memory_bytes
        self.allocated_compute -= s.compute_share
        if s.isolation == types_pb2.ISOLATION_MIG and s.profile:
            self.mig_layout.remove((s.profile, s.placement.start))
            self._layout_changed()
        self._reindex()


_GPU_WATCHED = frozenset({"health", "memory_pressure", "thermal_state", "mig_enabled", "memory_bytes",
                          "allocated_memory", "allocated_compute", "_used_slots"})


class FillIndex:
    """GPUs bucketed by fill (0-10), so best fit scans the fullest GPUs first and stops early."""

    def __init__(self) -> None:
        self.buckets: dict[int, dict[int, GpuState]] = {}

    def add(self, g: GpuState) -> None:
        g.fill_index, g.bucket = self, g.fill
        self.buckets.setdefault(g.bucket, {})[id(g)] = g

    def discard(self, g: GpuState) -> None:
        self.buckets.get(g.bucket, {}).pop(id(g), None)
        g.fill_index = None

    def move(self, g: GpuState) -> None:
        fill = g.fill
        if fill != g.bucket:
            self.buckets.get(g.bucket, {}).pop(id(g), None)
            g.bucket = fill
            self.buckets.setdefault(fill, {})[id(g)] = g

    def fullest_first(self):
        """Lists of GPUs, one per fill level, fullest first."""
        for fill in sorted(self.buckets, reverse=True):
            if fill >= 0 and self.buckets[fill]:
                yield list(self.buckets[fill].values())
