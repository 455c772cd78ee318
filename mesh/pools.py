"""Resource pools (seed 002): what a pool selects, what its slices take, and whether one more fits its quota.

No I/O and no control-plane imports: the pool store (controlplane/pools/) validates with `validate`, the
scheduler's Pool plugin (controlplane/scheduler/plugins/pool.py) asks `selects_gpu`, `selects_node` and
`refusal`, and PoolService.Get reports `usage`.

A slice belongs to a pool when it carries the label `LABEL` with the pool's name (the deployment controller
sets it on the replicas' slices of a deployment that names the pool).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import types_pb2
from mesh import errors, gpumodels, labels, replacing, slicespec
from mesh.cost import PriceTable, slice_share

LABEL = "gpumesh.pool"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ISOLATIONS = {types_pb2.ISOLATION_MIG: "mig", types_pb2.ISOLATION_MPS: "mps",
              types_pb2.ISOLATION_TIMESHARE: "timeshare", types_pb2.ISOLATION_EXCLUSIVE: "exclusive"}
ISOLATION_VALUES = {v: k for k, v in ISOLATIONS.items()}
MAX_TENANTS = 256
QUOTAS = ("max_gpus", "max_slices", "max_memory_bytes", "max_dollars_per_hour")


def check_name(name: str, field: str = "pool.name") -> str:
    if not NAME_RE.match(name or ""):
        raise errors.InvalidArgument.of(field, f"{name!r} is not a valid pool name" if name else "is required",
                                        "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def validate(pool: P.Pool) -> P.Pool:
    """A checked copy of `pool` (GPU model names canonical, output fields cleared); InvalidArgument naming
    the field otherwise."""
    check_name(pool.name)
    out = P.Pool()
    out.CopyFrom(pool)
    out.ClearField("usage")
    if len(out.description) > 1024:
        raise errors.InvalidArgument.of("pool.description", f"has {len(out.description)} characters", "at most 1024")
    models = []
    for i, name in enumerate(pool.selector.gpu_models):
        try:
            canonical = gpumodels.get_model(name).name
        except KeyError:
            raise errors.InvalidArgument.of(f"pool.selector.gpu_models[{i}]", f"unknown GPU model {name!r}",
                                            ", ".join(gpumodels.model_names())) from None
        if canonical not in models:
            models.append(canonical)
    del out.selector.gpu_models[:]
    out.selector.gpu_models.extend(models)
    for i, iso in enumerate(pool.selector.isolations):
        if iso not in ISOLATIONS:
            raise errors.InvalidArgument.of(f"pool.selector.isolations[{i}]", f"unknown isolation {iso}",
                                            ", ".join(ISOLATIONS.values()))
    for field, values, most in (("pool.selector.gpu_models", pool.selector.gpu_models, 32),
                                ("pool.selector.isolations", pool.selector.isolations, 4),
                                ("pool.selector.node_labels", pool.selector.node_labels, 32),
                                ("pool.tenants", pool.tenants, MAX_TENANTS)):
        if len(values) > most:
            raise errors.InvalidArgument.of(field, f"has {len(values)} entries", f"at most {most}")
    for i, t in enumerate(pool.tenants):
        if not slicespec.TENANT_RE.match(t):
            raise errors.InvalidArgument.of(f"pool.tenants[{i}]", f"{t!r} is not a tenant name",
                                            "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    labels.check(pool.selector.node_labels, "pool.selector.node_labels", 32)
    for field in QUOTAS:
        check_quota(field, getattr(pool.quota, field))
    return out


QUOTA_MAX = {"max_slices": 2**31 - 1, "max_memory_bytes": 2**63 - 1}     # what their int32 / int64 fields hold


def check_quota(field: str, v) -> None:
    """InvalidArgument naming `pool.quota.<field>` unless `v` is a number the quota may be."""
    most = QUOTA_MAX.get(field)
    if not (v >= 0 and math.isfinite(v) and (most is None or v <= most)):
        raise errors.InvalidArgument.of(f"pool.quota.{field}", f"{v!r} is negative, not finite or too large",
                                        "a number >= 0 (0: no limit)" + (f", at most {most}" if most else ""))


def parse_isolation(name: str, field: str = "isolation") -> int:
    v = ISOLATION_VALUES.get(name.strip().lower())
    if v is None:
        raise errors.InvalidArgument.of(field, f"unknown isolation {name!r}", ", ".join(ISOLATION_VALUES))
    return v


# -- selection --------------------------------------------------------------------------------

def isolation_on(requested: str | None, mig_enabled: bool) -> str:
    """The isolation a slice gets on a GPU: the one asked for, else MIG on a MIG-enabled GPU and time-share
    elsewhere (the scheduler's NodeResourcesFit for a memory-sized request with no isolation named)."""
    if requested:
        return requested
    return "mig" if mig_enabled else "timeshare"


def selects_gpu(pool: P.Pool, gpu_model: str, mig_enabled: bool, requested_isolation: str | None) -> str | None:
    """None when a slice of the pool may go on this GPU, else why not."""
    sel = pool.selector
    if sel.gpu_models and gpu_model not in sel.gpu_models:
        return f"pool {pool.name!r} selects GPU models {'|'.join(sel.gpu_models)}"
    if sel.isolations:
        kinds = [ISOLATIONS[i] for i in sel.isolations if i in ISOLATIONS]
        if isolation_on(requested_isolation, mig_enabled) not in kinds:
            return f"pool {pool.name!r} allows isolation {'|'.join(kinds)}"
    return None


def holds_gpu(pool: P.Pool, model: gpumodels.GpuModel, mig_enabled: bool) -> bool:
    """Whether a GPU counts in the pool's capacity: its model is selected and it can give one of the
    allowed isolation kinds (a MIG-enabled GPU gives MIG only; another, its model's other kinds)."""
    sel = pool.selector
    if sel.gpu_models and model.name not in sel.gpu_models:
        return False
    if not sel.isolations:
        return True
    possible = {"mig"} if mig_enabled else set(model.isolations) - {"mig"}
    return any(ISOLATIONS.get(i) in possible for i in sel.isolations)


def default_isolation(pool: P.Pool) -> int:
    """The isolation a deployment in the pool asks for when its spec leaves it unspecified: the pool's only
    allowed kind when it allows one, else unspecified (each GPU's own default, where the pool allows it)."""
    kinds = list(dict.fromkeys(pool.selector.isolations))
    return kinds[0] if len(kinds) == 1 else types_pb2.ISOLATION_UNSPECIFIED


def selects_node(pool: P.Pool, node_labels) -> bool:
    return all(node_labels.get(k) == v for k, v in pool.selector.node_labels.items())


# -- usage and quota --------------------------------------------------------------------------

@dataclass
class Usage:
    slices: int = 0
    gpus: float = 0.0
    memory_bytes: int = 0
    dollars_per_hour: float = 0.0


def slice_gpus(s) -> float:
    """A slice's GPU-equivalents (its charged share, mesh.cost.slice_share)."""
    return slice_share(int(s.isolation), s.gpu_model, profile=s.profile, memory_bytes=int(s.memory_bytes),
                       compute_share=float(s.compute_share))


def _figures(s, prices: PriceTable) -> tuple:
    share = slice_gpus(s)
    return 1, share, int(s.memory_bytes), share * prices.gpu_hour(s.gpu_model)


def usage(pool_name: str, slices, prices: PriceTable, replaced=None) -> Usage:
    """What the pool's slices (those labelled LABEL=pool_name among `slices`) take. `replaced` (Fleet.replaced:
    slice -> the source slice it replaces while its move is live, or None) counts a move's target and its source
    once, at the larger of the two in each figure (mesh/replacing.py); without it each slice counts."""
    mine = {s.id: s for s in slices if s.labels.get(LABEL) == pool_name}
    totals = [0, 0.0, 0, 0.0]
    for s in mine.values():
        totals = [a + b for a, b in zip(totals, _figures(s, prices))]
    if replaced is not None:
        for t in mine.values():
            src = replaced(t) if replacing.source_id(t.labels) else None
            if src is not None and mine.get(src.id) is src:
                twice = replacing.overlap(_figures(t, prices), _figures(src, prices))
                totals = [a - b for a, b in zip(totals, twice)]
    return Usage(slices=totals[0], gpus=totals[1], memory_bytes=totals[2], dollars_per_hour=totals[3])


def request_beyond(source, prices: PriceTable, slices: int, memory: int, gpus: float, dollars: float) -> tuple:
    """What a request for (`slices`, `memory`, `gpus`, `dollars`) asks of the pool beyond `source`, the slice it
    replaces (None: all of it): (slices, memory, gpus, dollars)."""
    if source is None:
        return slices, memory, gpus, dollars
    n, share, mem, cost = _figures(source, prices)
    return replacing.beyond((slices, memory, gpus, dollars), (n, mem, share, cost))


def refusal(pool: P.Pool, used: Usage, more_slices: int, more_memory: int, more_gpus: float,
            more_dollars_per_hour: float) -> str | None:
    """None when `more` fits the pool's quota on top of `used`, else the reason, naming the pool and the limit."""
    q = pool.quota
    checks = (("max_slices", q.max_slices, used.slices, more_slices),
              ("max_gpus", q.max_gpus, used.gpus, more_gpus),
              ("max_memory_bytes", q.max_memory_bytes, used.memory_bytes, more_memory),
              ("max_dollars_per_hour", q.max_dollars_per_hour, used.dollars_per_hour, more_dollars_per_hour))
    for name, limit, have, more in checks:
        if limit and have + more > limit + 1e-9:
            return (f"PoolExhausted: pool {pool.name!r} quota {name}={limit:g} reached "
                    f"(uses {have:g}, a replica asks {more:g} more)").replace("'", '"')
    return None


def room(limit: float, used: float) -> float:
    """What a quota leaves (-1: no limit)."""
    return max(0.0, limit - used) if limit else -1.0
