"""The v1 PoolService onto the pool store. Roles are checked by the interceptor (controlplane/api/auth.py
RULES): Create, Update and Delete need admin; Get and List a viewer or more. A tenant's caller reads the pools
its deployments may name (those open to every tenant, or naming its own), with its own tenant as the only one
listed, and its own deployments in the usage: which other tenants a pool admits is the operator's to read."""

from __future__ import annotations

from controlplane.api import auth
from controlplane.api.rpc import unary
from controlplane.pools.store import PoolStore
from gpumesh.v1 import pool_service_pb2 as P
from gpumesh.v1 import pool_service_pb2_grpc
from mesh import errors


def shown(p: P.Pool) -> P.Pool | None:
    """`p` (a view) as the caller may read it; None when it is another tenant's pool."""
    who = auth.current()
    if who.admin:
        return p
    if p.tenants and who.tenant not in p.tenants:
        return None
    if p.tenants:
        del p.tenants[:]
        p.tenants.append(who.tenant)
    return p


class PoolService(pool_service_pb2_grpc.PoolServiceServicer):
    def __init__(self, store: PoolStore) -> None:
        self.s = store

    @unary
    async def Create(self, request, context):
        return await self.s.create(request.pool)

    @unary
    async def Get(self, request, context):
        p = shown(self.s.view(self.s.get(request.name)))
        if p is None:
            raise errors.NotFound(f"no pool {request.name!r}", kind="pool", name=request.name)
        return p

    @unary
    async def List(self, request, context):
        return P.ListPoolsResponse(pools=[p for p in map(shown, self.s.list()) if p is not None])

    @unary
    async def Update(self, request, context):
        return await self.s.update(request.pool)

    @unary
    async def Delete(self, request, context):
        return await self.s.delete(request.name)
