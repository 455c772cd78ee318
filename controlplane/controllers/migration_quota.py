"""How a move counts against its pool and its tenant's quota (the MigrationManager's part for it).

A migration (`meshctl migrate`, a drain's moves, `meshctl recommend --apply` packing, the health controller's and
the orchestrator's moves) and a resize by migration allocate their target while the source slice still exists.
The target's request (`target_request`, the one builder of both) carries the label `gpumesh.replaces` with the
source's ID (mesh/replacing.py) and the migration's own label: the target is a reservation for the same workload,
and the pair counts once against the pool (scheduler plugin Pool, mesh/pools.py `usage`) and the tenant's quota
(TenantQuota, `Fleet.tenant_usage`), at the larger of the two in each figure. A move to an equal slice therefore
always fits a pool or a tenant at its limit, a resize's growth must still fit (else it is refused naming the pool
or the quota), and no room opens for a new allocation meanwhile. (Both used to count: every move of a slice of a
full pool or of a tenant at its quota was refused, and a drain could only evict such workloads.)

The pair is live (`reservation_live`) while its migration is unfinished (being planned included), and after it
while the source is on its way out: being released, or idle on a node being drained (the drain evicts it once
its other moves end; counting it again meanwhile refused the drain's next move). A rolled-back move releases its
target; a finished one whose source stays (`meshctl migrate` leaves the client's slice allocated) counts as the two
slices it is, so no tenant holds more than its quota by migrating. Restores (from a checkpoint) replace nothing.
"""

from __future__ import annotations

import dataclasses

from controlplane.controllers.migration_phases import FINISHED, LABEL, W
from gpumesh.v1 import types_pb2
from mesh import replacing, slicespec
from mesh.slicespec import SliceRequest


class QuotaMixin:
    """Mixed into MigrationManager (self.migrations, self.planning, self.wm)."""

    def attach_quota(self, fleet) -> None:
        """Let `fleet` count a live move's pair once (Fleet.replaced)."""
        if fleet is not None:
            fleet.reservation_live = self.reservation_live

    def reservation_live(self, t, source: types_pb2.Slice) -> bool:
        """Whether `t` (a target slice, or its request), labelled as replacing `source`, counts once with it."""
        mid = t.labels.get(LABEL, "")
        m = self.planning.get(mid) or self.migrations.get(mid)
        if m is None or source.id not in (m.source_slice, m.resize_slice) or m.checkpoint_id:
            return False
        if m.phase not in FINISHED:
            return True
        if source.state == types_pb2.SLICE_STATE_RELEASING:
            return True
        fleet = getattr(getattr(self, "ctl", None), "fleet", None)
        entry = fleet.nodes.get(source.node) if fleet is not None else None
        return bool(entry is not None and entry.record.draining and not self._runs_on(source.id))

    def _runs_on(self, sid: str) -> bool:
        wm = getattr(self, "wm", None)
        return wm is not None and any(w.slice_id == sid and w.state in (W.WORKLOAD_STATE_RUNNING,
                                                                         W.WORKLOAD_STATE_PENDING)
                                      for w in wm.workloads.values())

    def target_request(self, src: types_pb2.Slice, mid: str, profile: str = "", memory_bytes: int | None = None,
                       compute_share: float | None = None, replaces: bool = True) -> SliceRequest:
        """The request for migration `mid`'s target: a slice like `src` (its tenant, model, isolation, priority,
        labels, host resources), of `src`'s size unless a resize names another (`profile`, or `memory_bytes` and
        `compute_share`), labelled with the migration and, unless `replaces` is false (a restore), as `src`'s
        reservation."""
        spec = types_pb2.SliceSpec(tenant=src.tenant, gpu_model=src.gpu_model, isolation=src.isolation,
                                   priority=src.priority, labels=dict(src.labels), cpu_milli=src.cpu_milli,
                                   host_memory_bytes=src.host_memory_bytes)
        if profile or (src.isolation == types_pb2.ISOLATION_MIG and memory_bytes is None):
            spec.mig_profile = profile or src.profile
        else:
            spec.memory_bytes = src.memory_bytes if memory_bytes is None else memory_bytes
            spec.compute_share = src.compute_share if compute_share is None else compute_share
        spec.labels[LABEL] = mid
        spec.labels.pop(replacing.REPLACES, None)
        if replaces:
            spec.labels[replacing.REPLACES] = src.id
        return slicespec.validate(spec)


def off_node(req: SliceRequest, node: str) -> SliceRequest:
    """`req` kept off `node` (a migration's target off its source node)."""
    return dataclasses.replace(req, avoid_nodes=(node,))
