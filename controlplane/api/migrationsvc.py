"""The MigrationService servicer: the v1 API onto the MigrationManager, with tenant scoping."""

from __future__ import annotations

from controlplane.api import auth
from controlplane.controllers.migrations import FINISHED, MigrationManager
from controlplane.api.events import Subscription
from controlplane.api.rpc import streaming, unary
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import migration_service_pb2_grpc
from mesh import errors


class MigrationService(migration_service_pb2_grpc.MigrationServiceServicer):
    def __init__(self, manager: MigrationManager) -> None:
        self.m = manager

    def _own_workload(self, wid: str) -> None:
        w = self.m.wm.workloads.get(wid)
        if w is not None:
            auth.check_visible(w.tenant, "workload", wid)

    def _own(self, mid: str) -> M.Migration:
        m = self.m.get(mid)
        auth.check_visible(m.tenant, "migration", mid)
        return m

    @unary
    async def Migrate(self, request, context):
        if request.mode not in M.MigrationMode.values():
            raise errors.InvalidArgument.of("mode", f"{request.mode} is not a migration mode",
                                            "unspecified (precopy), precopy, stop_and_copy, transparent")
        self._own_workload(request.workload_id)
        return await self.m.migrate(request.workload_id, request.to_node, request.to_slice, request.mode)

    @unary
    async def Get(self, request, context):
        return self._own(request.id)

    @unary
    async def List(self, request, context):
        return M.ListMigrationsResponse(migrations=_listed(self.m.migrations.values(), request))

    @streaming
    async def Watch(self, request, context):
        m = self._own(request.id)
        q = Subscription("MigrationService.Watch", self.m.ctl.events.max_queue, context)   # bounded: events.py
        self.m.watchers.setdefault(m.id, []).append(q)
        try:
            yield m
            while m.phase not in FINISHED:
                nxt = await q.next()
                if nxt is None:
                    return
                m = nxt
                yield m
        finally:
            self.m.watchers.get(m.id, []).remove(q) if q in self.m.watchers.get(m.id, []) else None

    @unary
    async def Checkpoint(self, request, context):
        self._own_workload(request.workload_id)
        return await self.m.checkpoint(request.workload_id)

    @unary
    async def Restore(self, request, context):
        return await self.m.restore(request.checkpoint_id, request.to_node, request.to_slice)

    @unary
    async def ListCheckpoints(self, request, context):
        listed = _listed(self.m.checkpoints.values(), request)
        quota, scoped = self.m.checkpoint_quota, auth.scope_tenant(request.tenant)
        tenants = sorted({c.tenant for c in listed} | ({scoped} if scoped else set()))
        usage = [M.CheckpointUsage(tenant=t, bytes=quota.usage(self.m.checkpoints, t), limit_bytes=quota.limit(t))
                 for t in tenants]
        return M.ListCheckpointsResponse(checkpoints=listed, usage=usage)

    @unary
    async def Resize(self, request, context):
        return await self.m.resize(request.slice_id, request.memory_bytes, request.compute_share, request.mig_profile)


def _listed(records, request) -> list:
    """Migrations or checkpoints the caller may see, of `request.tenant` and `request.workload_id`
    when given, oldest first."""
    tenant = auth.scope_tenant(request.tenant)
    out = [r for r in records if (not tenant or r.tenant == tenant)
           and (not request.workload_id or r.workload_id == request.workload_id)]
    out.sort(key=lambda r: (r.created_at.seconds, r.created_at.nanos, r.id))
    return out
