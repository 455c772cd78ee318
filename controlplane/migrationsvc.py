"""The MigrationService servicer: the v1 API onto the MigrationManager, with tenant scoping."""

from __future__ import annotations

import asyncio

from controlplane import auth
from controlplane.migrations import FINISHED, MigrationManager
from controlplane.rpc import streaming, unary
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import migration_service_pb2_grpc


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
        self._own_workload(request.workload_id)
        return await self.m.migrate(request.workload_id, request.to_node, request.to_slice, request.mode)

    @unary
    async def Get(self, request, context):
        return self._own(request.id)

    @unary
    async def List(self, request, context):
        tenant = auth.scope_tenant(request.tenant)
        ms = [m for m in self.m.migrations.values()
              if (not tenant or m.tenant == tenant) and (not request.workload_id or m.workload_id == request.workload_id)]
        ms.sort(key=lambda m: (m.created_at.seconds, m.created_at.nanos, m.id))
        return M.ListMigrationsResponse(migrations=ms)

    @streaming
    async def Watch(self, request, context):
        m = self._own(request.id)
        q: asyncio.Queue = asyncio.Queue()
        self.m.watchers.setdefault(m.id, []).append(q)
        try:
            yield m
            while m.phase not in FINISHED:
                nxt = await q.get()
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
        tenant = auth.scope_tenant(request.tenant)
        cks = [c for c in self.m.checkpoints.values()
               if (not tenant or c.tenant == tenant) and (not request.workload_id or c.workload_id == request.workload_id)]
        cks.sort(key=lambda c: (c.created_at.seconds, c.created_at.nanos, c.id))
        return M.ListCheckpointsResponse(checkpoints=cks)

    @unary
    async def Resize(self, request, context):
        return await self.m.resize(request.slice_id, request.memory_bytes, request.compute_share, request.mig_profile)
