"""Variant overflow: replicas of the policy's next variant when the deployment's own variant gets no slice.

A deployment whose policy lists `variants` and whose replicas wait for lack of room (PENDING with no slice,
the actuator's "no slice yet: ..." message: the fleet has no room for the variant's need, or its pool's quota
is reached, PoolExhausted) gets a companion deployment `<name>-<variant>` of the first listed variant (other
than its own) that fits the fleet's free capacity: same model, tenant, pool, isolation and labels, plus the
label `gpumesh.overflow-of=<name>`, and no policy of its own. The autoscaler controller scales it:

- the parent is held at the replicas it has placed (its waiting replicas are dropped: they hold nothing),
  the companion gets the rest of what the autoscaler wants (total <= max_replicas; cost of both <= the
  ceiling);
- when the parent's variant fits again (a replica's need fits the fleet's free capacity), the parent grows
  back and the companion covers only what the parent has not got READY, down to 0: within max_replicas,
  by a surge when max leaves room, else one replica at a time (one companion replica less, one parent
  replica more, the next swap once the parent's placed replicas are all READY);
- a companion whose parent is gone, or whose parent's policy no longer lists variants, is deleted.

The fit is an estimate from the control plane's fleet (free MIG placements of the profile that holds the
need, else free memory on GPUs shared the same way); the scheduler decides, and a companion replica that gets
no slice waits like any other. When the estimate said the deployment's variant fits but its replica waits
again, the controller does not try the swap back for RETRY_S (the estimate missed what the scheduler saw).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from mesh.autoscale import choose_variant
from mesh.models import vram

LABEL_OVERFLOW_OF = "gpumesh.overflow-of"
# the parent's creation time (nanoseconds) on its companion: a deployment deleted and created again under the name
# (by its tenant: the tenant check passes) is another parent, which never adopts the earlier one's companion
LABEL_OVERFLOW_PARENT_CREATED = "gpumesh.overflow-of-created"
RETRY_S = 120.0                      # after a swap back ended with a replica waiting again, wait this long
NO_ROOM_PREFIX = "no slice yet"      # controlplane/serving/actuator.py: a replica's message when allocation failed


def companion_name(parent: str, variant: str) -> str:
    """`<parent>-<variant>` as a valid deployment name (letters, digits, '.', '_', '-'; at most 63). When that
    loses something (too long to fit, or a variant with characters a name cannot hold), the name is shortened
    and ends in a hash of the full pair: two long parents cut to the same prefix got one companion name, and
    the second parent's companion could never be created (its name taken by the first's)."""
    v = re.sub(r"[^A-Za-z0-9._-]", "-", variant).strip("-") or "variant"
    plain = f"{parent}-{v}"
    if v == variant and len(plain) <= 63:
        return plain
    digest = hashlib.sha256(f"{parent}\0{variant}".encode()).hexdigest()[:8]
    v = v[:20]
    return f"{parent[:63 - len(v) - len(digest) - 2]}-{v}-{digest}"


def created_stamp(d: D.Deployment) -> str:
    """A deployment's creation time as its companion's LABEL_OVERFLOW_PARENT_CREATED ("" when it has none)."""
    return str(d.created_at.ToNanoseconds()) if d.HasField("created_at") else ""


def belongs(c: D.Deployment, p: D.Deployment) -> bool:
    """Whether `c` is the overflow companion of `p`: labelled as its overflow, of its tenant (another tenant's
    deployment carrying the label is never it; DeploymentService also refuses the labels from a tenant:
    deploysvc.py), and made for this deployment, not an earlier one under its name (the parent's creation time in
    its label). A companion made before the label existed is its parent's when it was created after it."""
    if c.spec.labels.get(LABEL_OVERFLOW_OF) != p.spec.name or c.spec.tenant != p.spec.tenant:
        return False
    stamp = c.spec.labels.get(LABEL_OVERFLOW_PARENT_CREATED)
    if stamp is not None:
        return stamp == created_stamp(p)
    return c.created_at.ToNanoseconds() >= p.created_at.ToNanoseconds()


def companion_of(deployments: dict, parent: str) -> D.Deployment | None:
    """The deployment that takes `parent`'s overflow (`belongs`), None when there is none."""
    p = deployments.get(parent)
    if p is None:
        return None
    return next((d for _, d in sorted(deployments.items()) if belongs(d, p)), None)


def no_room(replicas: list[D.Replica]) -> int:
    """Replicas waiting because no slice fits (the fleet's room or the pool's quota)."""
    return sum(1 for r in replicas if r.state == D.REPLICA_STATE_PENDING and not r.slice_id
               and r.message.startswith(NO_ROOM_PREFIX))


def placed(replicas: list[D.Replica]) -> int:
    """Replicas that hold a slice (or serve): not waiting, not on their way out."""
    return sum(1 for r in replicas if r.state != D.REPLICA_STATE_TERMINATING
               and (r.slice_id or r.state == D.REPLICA_STATE_READY))


def fit_count(need: int, fleet, isolation: int = 0) -> int:
    """How many replicas needing `need` bytes the fleet's free capacity holds now (an estimate)."""
    if need <= 0 or fleet is None:
        return 0
    n = 0
    for entry in getattr(fleet, "nodes", {}).values():
        if not entry.schedulable:
            continue
        for g in entry.gpus:
            if g.health != "healthy":
                continue
            if g.mig_enabled:
                if isolation in (0, 1):
                    profile = vram.slice_for(need, g.model).mig_profile
                    if profile:
                        n += len(g.free_starts(profile))
            elif isolation != 1 and getattr(g, "sharing", None) in (None, "timeshare" if isolation == 3 else "mps"):
                n += max(0, g.memory_bytes - g.allocated_memory) // need
    return n


@dataclass(frozen=True)
class Split:
    """Replicas for the parent and the companion, and why."""

    parent: int
    companion: int
    reason: str
    bound_by: str = ""       # "" | "max" | "cost_ceiling" | "fit"


def split(desired: int, *, max_replicas: int, ceiling: float, parent_ready: int, parent_placed: int,
          waiting: int, companion_now: int, parent_fits: bool, companion_fit: int, parent_cost: float,
          companion_cost: float) -> Split:
    """Share `desired` (the autoscaler's total) between the parent and its companion.

    `waiting`: the parent's replicas waiting for room; `companion_now`: the companion's replicas now;
    `parent_fits`: one more parent replica fits the fleet (and its pool); `companion_fit`: companion replicas the fleet
    holds beyond what the companion has."""
    if waiting > 0:                 # the scheduler's answer: no slice for the deployment's variant now
        parent = min(desired, parent_placed)
        why = f"{waiting} replica(s) wait for room"
        want = max(0, desired - min(parent_ready, parent))
        comp, bound = want, ""
        if comp > max(0, max_replicas - parent):
            comp, bound = max(0, max_replicas - parent), "max"
    elif companion_now > 0 and parent_fits:
        # room again: swap back within max_replicas, one replica at a time unless max leaves room to surge;
        # a swap waits until the deployment's placed replicas are all READY
        want = max(0, desired - parent_ready)
        comp = min(want, companion_now)
        parent = max(0, min(desired, max_replicas - comp))
        if parent <= parent_placed and comp > 0 and parent < desired and parent_ready >= parent_placed:
            comp, parent = comp - 1, parent + 1
        why, bound = "room for the deployment's variant again", ""
    elif companion_now > 0:
        parent = min(desired, parent_placed)
        why = "the deployment's variant still does not fit"
        want = max(0, desired - min(parent_ready, parent))
        comp, bound = want, ""
        if comp > max(0, max_replicas - parent):
            comp, bound = max(0, max_replicas - parent), "max"
    else:
        return Split(desired, 0, "")
    if comp > companion_now + companion_fit:
        comp, bound = companion_now + companion_fit, "fit"
    if ceiling > 0 and companion_cost > 0:
        left = ceiling - parent * parent_cost
        afford = max(0, math.floor(left / companion_cost + 1e-9))
        if comp > afford:
            comp, bound = afford, "cost_ceiling"
    if comp == 0 and companion_now == 0:
        return Split(desired, 0, "")        # nothing to overflow into: the deployment keeps asking
    return Split(parent, comp, f"{why}: the deployment {parent}, the companion {comp} (wanted {want})", bound)


def next_variant(policy_variants: tuple[str, ...], own: str, fits) -> str | None:
    """The first variant of the policy (not the deployment's own) for which `fits(name)` is true."""
    return choose_variant([(v, v != own and fits(v)) for v in policy_variants])


def companion_spec(parent: D.DeploymentSpec, variant: str, replicas: int, v: M.Variant | None = None,
                   parent_created: str = "") -> D.DeploymentSpec:
    """The parent's spec as `variant` (the registry's `v` when known: settings of the parent's backend that
    this variant does not take are left to the variant's defaults), with no policy and the overflow labels
    (`parent_created`: the parent's `created_stamp`)."""
    spec = D.DeploymentSpec()
    spec.CopyFrom(parent)
    spec.ClearField("scaling")
    spec.name = companion_name(parent.name, variant)
    spec.variant = variant
    spec.replicas = replicas
    spec.labels[LABEL_OVERFLOW_OF] = parent.name
    spec.labels.pop(LABEL_OVERFLOW_PARENT_CREATED, None)
    if parent_created:
        spec.labels[LABEL_OVERFLOW_PARENT_CREATED] = parent_created
    if v is not None:
        if v.backend != M.BACKEND_VLLM:
            spec.backend.device = ""                  # vLLM's build: not for a llama.cpp variant
        if spec.backend.context > v.max_context:
            spec.backend.context = 0                  # the variant's own
    return spec
