"""GPU model catalog and pure MIG placement math.

A MIG-capable GPU has 8 memory slots and 7 compute slices. A GPU instance
(GI) of a profile occupies ``memory_slices`` consecutive memory slots from a
start slot listed in ``MigProfile.starts``; the instances on one GPU may not
overlap, may not use more than 7 compute slices together, and each profile
has a per-GPU instance limit. NVML calls ``memory_slices`` the placement size.

No NVML import here: the scheduler uses this module too. The NVML enum values
in the profile tables equal ``pynvml.NVML_GPU_INSTANCE_PROFILE_*`` and
``pynvml.NVML_COMPUTE_INSTANCE_PROFILE_*`` (a unit test checks that).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

MIG_MEMORY_SLOTS = 8
MIG_COMPUTE_SLICES = 7

Placement = tuple[str, int]  # (profile name, start slot)

# pynvml.NVML_GPU_INSTANCE_PROFILE_* values.
_GI_1, _GI_2, _GI_3, _GI_4, _GI_7 = 0x0, 0x1, 0x2, 0x3, 0x4
_GI_1_REV1, _GI_1_REV2 = 0x7, 0x9
# pynvml.NVML_COMPUTE_INSTANCE_PROFILE_* values.
_CI_1, _CI_2, _CI_3, _CI_4, _CI_7 = 0x0, 0x1, 0x2, 0x3, 0x4


@dataclass(frozen=True)
class MigProfile:
    """One GPU-instance profile of a model, as NVML reports it."""

    name: str  # "1g.10gb", "1g.10gb+me", "7g.80gb"
    gi_profile_id: int  # profileInfo.id: 7g=0, 4g=5, 3g=9, 2g=14, 1g(2 mem slices)=15, 1g=19, 1g+me=20
    nvml_profile: int  # NVML_GPU_INSTANCE_PROFILE_* passed to nvmlDeviceGetGpuInstanceProfileInfo
    ci_profile: int  # NVML_COMPUTE_INSTANCE_PROFILE_* of one CI spanning the whole GI
    memory_slices: int  # of 8; the NVML placement size
    compute_slices: int  # of 7
    max_instances: int  # per GPU
    starts: tuple[int, ...]  # valid placement start slots
    memory_mib: int
    multiprocessors: int
    media_extensions: bool = False


@dataclass(frozen=True)
class GpuModel:
    """A GPU model: identity, capacity and its MIG profile table."""

    name: str  # canonical, e.g. "H100-80GB"
    product_name: str  # what nvmlDeviceGetName returns
    memory_mib: int
    multiprocessors: int
    tdp_w: int
    mig_profiles: tuple[MigProfile, ...]  # () for non-MIG models
    isolations: frozenset[str]  # subset of {"mig", "mps", "timeshare", "exclusive"}
    nvlink_links: int = 0  # NVLink links per GPU; 0 for PCIe-only models

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_profiles)

    def profile(self, name: str) -> MigProfile:
        """The profile called ``name``; KeyError naming the allowed names."""
        for p in self.mig_profiles:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.mig_profiles) or "none (not MIG-capable)"
        raise KeyError(f"unknown MIG profile {name!r} for {self.name}; allowed: {allowed}")

    def profile_by_id(self, gi_profile_id: int) -> MigProfile:
        """The profile whose NVML GI profile ID is ``gi_profile_id``."""
        for p in self.mig_profiles:
            if p.gi_profile_id == gi_profile_id:
                return p
        allowed = ", ".join(f"{p.gi_profile_id} ({p.name})" for p in self.mig_profiles) or "none"
        raise KeyError(f"unknown GI profile id {gi_profile_id} for {self.name}; allowed: {allowed}")

    def smallest_profile_for(self, memory_bytes: int, compute_share: float) -> MigProfile | None:
        """Smallest non-+me profile with enough memory and compute share, or None."""
        fits = [
            p
            for p in self.mig_profiles
            if not p.media_extensions
            and p.memory_mib * 2**20 >= memory_bytes
            and p.compute_slices / MIG_COMPUTE_SLICES + 1e-9 >= compute_share
        ]
        return min(fits, key=lambda p: (p.memory_slices, p.compute_slices), default=None)


# (compute slices, memory slices, +me, GI enum, GI profile id, CI enum, max instances, starts)
_MIG_SHAPES = (
    (1, 1, False, _GI_1, 19, _CI_1, 7, tuple(range(7))),
    (1, 1, True, _GI_1_REV1, 20, _CI_1, 1, tuple(range(7))),
    (1, 2, False, _GI_1_REV2, 15, _CI_1, 4, (0, 2, 4, 6)),
    (2, 2, False, _GI_2, 14, _CI_2, 3, (0, 2, 4)),
    (3, 4, False, _GI_3, 9, _CI_3, 2, (0, 4)),
    (4, 4, False, _GI_4, 5, _CI_4, 1, (0,)),
    (7, 8, False, _GI_7, 0, _CI_7, 1, (0,)),
)


def _mig_table(gb: dict[int, int], mib: dict[int, int], sms: dict[int, int]) -> tuple[MigProfile, ...]:
    """Build the 7-profile table; gb/mib keyed by memory slices, sms by compute slices (or by
    (compute, memory) slices where a profile differs, as H100's 1g.20gb with 26 SMs)."""
    out = []
    for compute, mem, me, gi_enum, gi_id, ci_enum, max_n, starts in _MIG_SHAPES:
        out.append(
            MigProfile(
                name=f"{compute}g.{gb[mem]}gb" + ("+me" if me else ""),
                gi_profile_id=gi_id,
                nvml_profile=gi_enum,
                ci_profile=ci_enum,
                memory_slices=mem,
                compute_slices=compute,
                max_instances=max_n,
                starts=starts,
                memory_mib=mib[mem],
                multiprocessors=sms.get((compute, mem), sms[compute]),
                media_extensions=me,
            )
        )
    return tuple(out)


_A100_SMS = {1: 14, 2: 28, 3: 42, 4: 56, 7: 98}
_H100_SMS = {1: 16, (1, 2): 26, 2: 32, 3: 60, 4: 64, 7: 132}  # as NVML reports on an H100 80GB HBM3
_MIG_ISOLATIONS = frozenset({"mig", "mps", "timeshare", "exclusive"})
_PLAIN_ISOLATIONS = frozenset({"mps", "timeshare", "exclusive"})

_CATALOG = (
    GpuModel("A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, 108, 400,
             _mig_table({1: 5, 2: 10, 4: 20, 8: 40}, {1: 4864, 2: 9856, 4: 19968, 8: 40192}, _A100_SMS),
             _MIG_ISOLATIONS, nvlink_links=12),
    GpuModel("A100-80GB", "NVIDIA A100-SXM4-80GB", 81920, 108, 400,
             _mig_table({1: 10, 2: 20, 4: 40, 8: 80}, {1: 9728, 2: 19968, 4: 40192, 8: 80896}, _A100_SMS),
             _MIG_ISOLATIONS, nvlink_links=12),
    GpuModel("H100-80GB", "NVIDIA H100 80GB HBM3", 81559, 132, 700,
             _mig_table({1: 10, 2: 20, 4: 40, 8: 80}, {1: 9984, 2: 20096, 4: 40448, 8: 81152}, _H100_SMS),
             _MIG_ISOLATIONS, nvlink_links=18),
    GpuModel("H200-141GB", "NVIDIA H200", 143771, 132, 700,
             _mig_table({1: 18, 2: 35, 4: 71, 8: 141}, {1: 17664, 2: 35584, 4: 71424, 8: 143104}, _H100_SMS),
             _MIG_ISOLATIONS, nvlink_links=18),
    GpuModel("L4", "NVIDIA L4", 23034, 58, 72, (), _PLAIN_ISOLATIONS),
    GpuModel("A10", "NVIDIA A10", 23028, 72, 150, (), _PLAIN_ISOLATIONS),
    GpuModel("T4", "Tesla T4", 15360, 40, 70, (), _PLAIN_ISOLATIONS),
    GpuModel("V100-32GB", "Tesla V100-SXM2-32GB", 32768, 80, 300, (), _PLAIN_ISOLATIONS, nvlink_links=6),
)

MODELS: dict[str, GpuModel] = {m.name: m for m in _CATALOG}

_ALIASES = {
    "a100": "A100-40GB", "a100-40g": "A100-40GB", "a100-pcie-40gb": "A100-40GB",
    "a100-80g": "A100-80GB", "a100-pcie-80gb": "A100-80GB",
    "h100": "H100-80GB", "h100-sxm": "H100-80GB", "h100-sxm5": "H100-80GB",
    "h100-80g": "H100-80GB", "h100-sxm5-80gb": "H100-80GB",
    "h200": "H200-141GB", "h200-sxm": "H200-141GB", "h200-141g": "H200-141GB",
    "v100": "V100-32GB", "v100-32g": "V100-32GB", "v100m32": "V100-32GB",
}


def _norm(name: str) -> str:
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    return re.sub(r"^(nvidia-|tesla-)+", "", key)


_LOOKUP = {**{_norm(k): v for k, v in _ALIASES.items()},
           **{_norm(m.product_name): m.name for m in _CATALOG},
           **{_norm(m.name): m.name for m in _CATALOG}}


def get_model(name: str) -> GpuModel:
    """Model by canonical name, alias or NVML product name (case-insensitive)."""
    canonical = _LOOKUP.get(_norm(name))
    if canonical is None:
        raise KeyError(f"unknown GPU model {name!r}; allowed: {', '.join(MODELS)}")
    return MODELS[canonical]


def model_names() -> list[str]:
    """Canonical model names in catalog order."""
    return list(MODELS)


def placement_conflict(model: GpuModel, occupied: Iterable[Placement], profile: str, start: int) -> str | None:
    """None if ``(profile, start)`` fits beside ``occupied``, else the reason.

    KeyError if a profile name is unknown for the model.
    """
    p = model.profile(profile)
    if start not in p.starts:
        valid = ", ".join(map(str, p.starts))
        return f"{p.name} cannot start at memory slot {start} on {model.name} (valid starts: {valid})"
    occ = [(model.profile(n), s) for n, s in occupied]
    end = start + p.memory_slices
    for q, s in occ:
        if s < end and start < s + q.memory_slices:
            return (f"{p.name}@{start} (memory slots {start}-{end - 1}) overlaps "
                    f"{q.name}@{s} (memory slots {s}-{s + q.memory_slices - 1})")
    compute = p.compute_slices + sum(q.compute_slices for q, _ in occ)
    if compute > MIG_COMPUTE_SLICES:
        return f"compute slices would total {compute}, more than the {MIG_COMPUTE_SLICES} of {model.name}"
    if 1 + sum(1 for q, _ in occ if q.name == p.name) > p.max_instances:
        return f"{p.name} allows at most {p.max_instances} instance(s) per GPU"
    return None


def free_starts(model: GpuModel, occupied: Iterable[Placement], profile: str) -> list[int]:
    """Start slots at which ``profile`` can be added to ``occupied``."""
    occ = list(occupied)
    return [s for s in model.profile(profile).starts if placement_conflict(model, occ, profile, s) is None]


def enumerate_layouts(model: GpuModel, maximal_only: bool = False) -> list[tuple[Placement, ...]]:
    """Every valid layout as a sorted tuple of placements (each once).

    Includes the empty layout unless ``maximal_only``; maximal layouts are
    those to which no placement can be added.
    """
    return list(_layouts(model, maximal_only))


@functools.lru_cache(maxsize=None)
def _layouts(model: GpuModel, maximal_only: bool) -> tuple[tuple[Placement, ...], ...]:
    cands = sorted((p.name, s) for p in model.mig_profiles for s in p.starts)
    out: list[tuple[Placement, ...]] = []

    def walk(layout: list[Placement], first: int) -> None:
        if not maximal_only or all(placement_conflict(model, layout, n, s) for n, s in cands):
            out.append(tuple(layout))
        for i in range(first, len(cands)):
            if placement_conflict(model, layout, *cands[i]) is None:
                layout.append(cands[i])
                walk(layout, i + 1)
                layout.pop()

    if model.mig_capable:
        walk([], 0)
    return tuple(out)
