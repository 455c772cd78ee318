"""A replica follows its workload when a migration moved it.

A deployment's `Replica` record names where its backend runs (slice, node, GPU, allocation, endpoint). A
migration (a transparent one from `meshctl migrate --mode transparent`, the health controller, the
orchestrator's pre-migration, `meshctl recommend --apply`) moves the replica's *workload* to another slice,
with everything in its record (controlplane/controllers/migration_records.py): its backend settings, its
replica key, its labels. Once that migration is over (DONE: the target runs, the source stopped), the
deployment controller, at the start of each pass and before it judges the replicas, points the replica's
record at the workload's slice and endpoint (`moved`) and releases the slice the replica held before (the
migration left it allocated, and no one else would release it). Derived each pass from the durable workload
and slice records, so a control-plane restart anywhere in between finishes it: the old slice is released
first, then the replica written; a pass that finds the replica still naming its old slice releases nothing
twice (the slice is gone) and writes the replica.

While the migration runs the replica keeps its old record (the source is the workload until the commit;
between the commit and DONE the source's slice still exists, so the replica is not judged lost).
"""

from __future__ import annotations

import logging

from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger("controlplane.serving.deployments")
W = types_pb2
ENDED = (W.WORKLOAD_STATE_SUCCEEDED, W.WORKLOAD_STATE_FAILED, W.WORKLOAD_STATE_STOPPED)


def moved(r: D.Replica, w: types_pb2.Workload, s: types_pb2.Slice) -> D.Replica | None:
    """The replica's record once its workload `w` runs on slice `s` (None when the record says so already)."""
    n = D.Replica()
    n.CopyFrom(r)
    n.slice_id, n.node, n.gpu_uuid, n.gpu_index, n.gpu_model = s.id, s.node, s.gpu_uuid, s.gpu_index, s.gpu_model
    n.isolation, n.profile, n.memory_bytes = s.isolation, s.profile, s.memory_bytes
    if s.allocation_id:
        n.allocation_id = s.allocation_id
    if w.endpoint:
        n.endpoint = w.endpoint
        n.endpoint_certificate = w.endpoint_certificate     # the server there presents this one
    if n == r:
        return None
    return n


async def follow(ctl, workloads, store, r: D.Replica) -> D.Replica | None:
    """Point `r` at the slice its workload runs on now, when a finished migration moved it (see the module's
    docstring); the new record, or None when nothing moved. errors.MeshError when the old slice cannot be
    released (the next pass tries again)."""
    w = workloads.workloads.get(r.workload_id) if r.workload_id else None
    if w is None or w.state in ENDED or not r.slice_id or w.slice_id == r.slice_id and w.node == r.node:
        return None
    migrations = getattr(ctl, "migrations", None)
    if migrations is not None and migrations.active_for(w.id) is not None:
        return None         # not over yet: the source's slice is the replica's until DONE
    s = ctl.fleet.slices.get(w.slice_id)
    if s is None:
        return None
    n = moved(r, w, s)
    if n is None:
        return None
    old = r.slice_id if r.slice_id != w.slice_id else ""
    if old and (old in ctl.fleet.slices or ctl.fleet.slices_of(old)):
        try:
            await ctl.release(old, wait=False, message=f"replica {r.id} of deployment {r.deployment} moved to "
                                                       f"slice {s.id} on {s.node} (migration of {w.id})")
        except errors.NotFound:
            pass            # released meanwhile
    await store.put_replica(n)
    log(logger, logging.INFO, "replica follows its migrated workload", deployment=r.deployment, replica=r.id,
        workload=w.id, slice=s.id, node=s.node, released=old, endpoint=n.endpoint)
    return n
