"""The v1 PoolService onto the pool store. Roles are checked by the interceptor (controlplane/api/auth.py
RULES): Create, Update and Delete need admin; Get and List a viewer or more (tenants read the pools their
deployments may name)."""

from __future__ import annotations

from controlplane.api.rpc import unary
from controlplane.pools.store import PoolStore
from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import pool_service_pb2_grpc


class PoolService(pool_service_pb2_grpc.PoolServiceServicer):
    def __init__(self, store: PoolStore) -> None:
        self.s = store

    @unary
    async def Create(self, request, context):
        return await self.s.create(request.pool)

    @unary
    async def Get(self, request, context):
        return self.s.view(self.s.get(request.name))

    @unary
    async def List(self, request, context):
        return P.ListPoolsResponse(pools=self.s.list())

    @unary
    async def Update(self, request, context):
        return await self.s.update(request.pool)

    @unary
    async def Delete(self, request, context):
        return await self.s.delete(request.name)
