"""A drain's replacement replica counts once with the old replica it replaces (mesh/replacing.py).

A drain (`meshctl drain`, NodeManager.drain) leaves a deployment's replicas on the node to the deployment
controller, which creates a replacement for each elsewhere first and removes the old one once enough replacements
are READY (controlplane/serving/reconcile.py `_drain`). The replacement is allocated while the old replica still
holds its slice; counted as two, a pool or a tenant quota exactly full with the deployment's replicas refused it
and the old replica stayed on the drained node for ever. So, as a migration's target is, the replacement's slice
is a reservation for the old one: the actuator labels its request `gpumesh.replaces=<old slice>` (`source_for`
picks one old slice per replacement) and the pair counts once, at the larger of the two (`live`, asked by
Fleet.replaced), while

- the old slice is on a node being drained (its record's `draining`),
- both slices are the same deployment's (label gpumesh.deployment; Fleet.replaced checks the tenant) and of two
  different replicas (a migration's target of a replica carries that replica's label: the migration manager
  judges it), and
- the replacement is the old slice's only claim: of the slices naming it, the first by ID (a request, not placed
  yet, only while none names it), so one old slice never lends its room twice.

Only gpumesh sets these labels (mesh/slicespec.py SYSTEM_LABELS: a tenant's Allocate or deployment naming one is
refused). Everything is read from the slice and node records, so a new leader, or a standby's view, counts the
same; nothing is remembered. The pair ends when the old slice leaves the fleet (released once the replacement is
READY: the replacement then counts alone, the figure the pair had) or the drain is called off (uncordon: both
count, and the deployment's surplus replica is removed).
"""

from __future__ import annotations

from controlplane.serving.deployspec import LABEL_DEPLOYMENT, LABEL_REPLICA
from gpumesh.v1 import types_pb2
from mesh import replacing


def _pairs(fleet, labels, tenant: str, source: types_pb2.Slice) -> bool:
    """Whether a slice or request with `labels` of `tenant` may replace `source` as a drain's replacement: the
    same deployment, another replica, `source` on a draining node (the claim is not checked here)."""
    deployment, replica = labels.get(LABEL_DEPLOYMENT, ""), labels.get(LABEL_REPLICA, "")
    if not deployment or not replica or source.tenant != tenant:
        return False
    if source.labels.get(LABEL_DEPLOYMENT) != deployment or source.labels.get(LABEL_REPLICA, replica) == replica:
        return False
    entry = fleet.nodes.get(source.node)
    return entry is not None and entry.record.draining


def _claims(fleet, source_id: str) -> list[str]:
    """The IDs of the slices naming `source_id` as the one they replace, in order."""
    return sorted(i for i in fleet.reservations if replacing.source_id(fleet.slices[i].labels) == source_id)


def live(fleet, t, source: types_pb2.Slice) -> bool:
    """Whether `t` (a slice, or a request: its `labels` and `tenant`), labelled as replacing `source`, is a drain's
    replacement for it that counts once with it now."""
    if not _pairs(fleet, t.labels, t.tenant, source):
        return False
    claims = _claims(fleet, source.id)
    sid = getattr(t, "id", "")
    return claims[0] == sid if sid in fleet.slices else not claims


def source_for(fleet, deployment: str, tenant: str, replica: str) -> str:
    """The slice a new replica `replica` of `deployment` replaces: the first (by ID) of the deployment's other
    replicas' slices on a draining node that no slice claims yet, or "" (nothing is being drained, each draining
    replica has its replacement already: a new replica then counts as one more)."""
    labels = {LABEL_DEPLOYMENT: deployment, LABEL_REPLICA: replica}
    for name in sorted(n for n, e in fleet.nodes.items() if e.record.draining):
        for s in sorted(fleet.slices_on(name), key=lambda s: s.id):
            if _pairs(fleet, labels, tenant, s) and not _claims(fleet, s.id):
                return s.id
    return ""
