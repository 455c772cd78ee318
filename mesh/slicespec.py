"""Validation of a client's SliceSpec into a normalized request.

Every refusal is an `InvalidArgument` that names the field (`spec.<field>`)
and the allowed values, so a client sees exactly what to fix.
"""

from __future__ import annotations

import math
import re
import dataclasses
from dataclasses import dataclass, field

from gpumesh.v1 import types_pb2

from mesh import errors, gpumodels, labels, netmode

ISOLATIONS = {
    types_pb2.ISOLATION_MIG: "mig",
    types_pb2.ISOLATION_MPS: "mps",
    types_pb2.ISOLATION_TIMESHARE: "timeshare",
    types_pb2.ISOLATION_EXCLUSIVE: "exclusive",
}
ISOLATION_ENUM = {v: k for k, v in ISOLATIONS.items()}
TOPOLOGIES = {
    types_pb2.TOPOLOGY_ANY: "any",
    types_pb2.TOPOLOGY_SAME_NODE: "same-node",
    types_pb2.TOPOLOGY_SAME_NVLINK_DOMAIN: "same-nvlink",
}
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_COUNT = 64
PRIORITY_RANGE = (-1000, 1000)
MAX_LABELS = 32
# labels that say what gpumesh made a slice for (a warm slice, a pool's or a deployment's replica): gpumesh
# sets them (admins may, by hand); a tenant's own would bill or release its slice as something it is not
# (gpumesh.replaces: a move's target, counted once with the slice it replaces: mesh/replacing.py)
SYSTEM_LABELS = frozenset({"gpumesh.io/warm", "gpumesh.io/warm-key", "gpumesh.pool", "gpumesh.deployment",
                           "gpumesh.replica", "gpumesh.replaces"})
MAX_CPU_MILLI = 4096 * 1000          # 4,096 CPUs
MAX_HOST_MEMORY = 64 << 40           # 64 TiB


@dataclass(frozen=True)
class SliceRequest:
    """A validated, normalized request for `count` identical slices."""

    tenant: str
    memory_bytes: int            # 0 when a MIG profile decides the size
    compute_share: float         # 0.0 = not given
    isolation: str | None        # None = the control plane picks
    gpu_model: str | None        # canonical name or None for any
    mig_profile: str | None
    count: int
    topology: str
    priority: int
    labels: dict[str, str] = field(default_factory=dict)
    cpu_milli: int = 0                 # host CPU per slice
    host_memory_bytes: int = 0         # host memory per slice
    preempt: bool = False
    anti_affinity: dict[str, str] = field(default_factory=dict)
    gpu_models: tuple[str, ...] = ()   # any of these models (the trace's gpu_spec); () = no constraint
    # nodes the slices must not go to (internal: a migration's target off its source node; no API field)
    avoid_nodes: tuple[str, ...] = ()
    # the one GPU (node, index) the slice must go to (internal: a move pinned by `meshctl recommend --apply`'s
    # pack to the GPU it listed; no API field)
    only_gpu: tuple[str, int] | None = None

    def one(self) -> "SliceRequest":
        """The same request for a single slice (a spread gang is placed one slice at a time)."""
        return dataclasses.replace(self, count=1)


def _bad(name: str, problem: str, allowed: str = "") -> errors.InvalidArgument:
    return errors.InvalidArgument.of(f"spec.{name}", problem, allowed)


def validate(spec: types_pb2.SliceSpec) -> SliceRequest:
    if not TENANT_RE.match(spec.tenant):
        raise _bad("tenant", f"{errors.shown(spec.tenant)} is not a valid tenant name" if spec.tenant else
                   "is required",
                   "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")

    model = None
    if spec.gpu_model:
        try:
            model = gpumodels.get_model(spec.gpu_model)
        except KeyError:
            raise _bad("gpu_model", f"unknown GPU model {errors.shown(spec.gpu_model)}",
                       ", ".join(gpumodels.model_names())) from None

    if spec.isolation not in ISOLATIONS and spec.isolation != types_pb2.ISOLATION_UNSPECIFIED:
        raise _bad("isolation", f"unknown isolation value {spec.isolation}", ", ".join(ISOLATIONS.values()))
    isolation = ISOLATIONS.get(spec.isolation)

    profile = None
    if spec.mig_profile:
        if isolation not in (None, "mig"):
            raise _bad("mig_profile", f"a MIG profile needs isolation mig, not {isolation}", "mig")
        isolation = "mig"
        candidates = [model] if model else [m for m in gpumodels.MODELS.values() if m.mig_capable]
        names = sorted({p.name for m in candidates if m for p in m.mig_profiles})
        if spec.mig_profile not in names:
            where = f"GPU model {model.name}" if model else "any MIG-capable GPU model"
            raise _bad("mig_profile", f"unknown MIG profile {errors.shown(spec.mig_profile)} for {where}",
                       ", ".join(names) if names else f"none: {model.name} has no MIG")
        profile = spec.mig_profile

    if model is not None and isolation is not None and isolation not in model.isolations:
        raise _bad("isolation", f"GPU model {model.name} cannot give {isolation} isolation",
                   ", ".join(sorted(model.isolations)))

    largest = max(m.memory_mib for m in gpumodels.MODELS.values()) << 20
    if spec.memory_bytes < 0 or (spec.memory_bytes == 0 and profile is None):
        raise _bad("memory_bytes", f"{spec.memory_bytes} is not a positive size",
                   f"1 byte to {largest} bytes, or 0 with spec.mig_profile")
    limit = (model.memory_mib << 20) if model else largest
    if spec.memory_bytes > limit:
        what = f"a {model.name}" if model else "the largest GPU model"
        raise _bad("memory_bytes", f"{spec.memory_bytes} bytes is more than {what} has", f"at most {limit}")

    share = spec.compute_share
    if math.isnan(share) or share < 0 or share > 1:
        raise _bad("compute_share", f"{share} is outside (0, 1]", "a fraction in (0, 1], or 0 for the default")

    if spec.count < 0 or spec.count > MAX_COUNT:
        raise _bad("count", f"{spec.count} slices", f"1 to {MAX_COUNT} (0 means 1)")
    count = spec.count or 1

    if spec.topology not in TOPOLOGIES:
        raise _bad("topology", f"unknown topology value {spec.topology}", ", ".join(TOPOLOGIES.values()))

    lo, hi = PRIORITY_RANGE
    if not lo <= spec.priority <= hi:
        raise _bad("priority", f"{spec.priority} is out of range", f"{lo} to {hi}")

    labels.check(spec.labels, "spec.labels", MAX_LABELS)
    netmode.check_labels(spec.labels, "spec.labels")     # gpumesh.io/network: host or none

    if spec.cpu_milli < 0 or spec.cpu_milli > MAX_CPU_MILLI:
        raise _bad("cpu_milli", f"{spec.cpu_milli} milli-CPUs", f"0 to {MAX_CPU_MILLI} (0: none reserved)")
    if spec.host_memory_bytes < 0 or spec.host_memory_bytes > MAX_HOST_MEMORY:
        raise _bad("host_memory_bytes", f"{spec.host_memory_bytes} bytes", f"0 to {MAX_HOST_MEMORY} (0: none reserved)")
    labels.check(spec.anti_affinity, "spec.anti_affinity", MAX_LABELS, "rules")

    return SliceRequest(tenant=spec.tenant, memory_bytes=spec.memory_bytes, compute_share=share,
                        isolation=isolation, gpu_model=model.name if model else None, mig_profile=profile,
                        count=count, topology=TOPOLOGIES[spec.topology], priority=spec.priority,
                        labels=dict(spec.labels), cpu_milli=spec.cpu_milli,
                        host_memory_bytes=spec.host_memory_bytes, preempt=spec.preempt,
                        anti_affinity=dict(spec.anti_affinity))
