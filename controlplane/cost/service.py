"""The v1 CostService: costs from the ledger (GetCost) and consolidation (Recommend). Admins read
the whole fleet's costs, tenants and viewers their own tenant's; Recommend with apply needs admin (checked here: the
interceptor's rule for Recommend is viewer, so anyone may read the recommendations)."""

from __future__ import annotations

import asyncio
import math

from controlplane.api import auth
from controlplane.api.rpc import unary
from controlplane.cost.accountant import CostAccountant
from controlplane.cost.recommender import Recommender
from gpumesh.v1 import cost_service_pb2 as C
from gpumesh.v1 import cost_service_pb2_grpc
from mesh import errors
from mesh.cost.accounting import GROUPS, per_1k_tokens

DEFAULT_SINCE = 86400.0


def line(ln, rate: float) -> C.CostLine:
    return C.CostLine(key=ln.key, dollars=ln.dollars, idle_warm_dollars=ln.idle_warm_dollars,
                      idle_replica_dollars=ln.idle_replica_dollars, slice_seconds=ln.slice_seconds,
                      gpu_seconds=ln.gpu_seconds, dollars_per_hour=rate, tokens=ln.tokens,
                      dollars_per_1k_tokens=per_1k_tokens(ln.dollars, ln.tokens))


MAX_LINES = 50_000     # one GetCost answer (by slice over a long window can be more)
CHUNK = 1000           # lines built between two yields of the event loop


class CostService(cost_service_pb2_grpc.CostServiceServicer):
    def __init__(self, accountant: CostAccountant, recommender: Recommender) -> None:
        self.acc = accountant
        self.rec = recommender

    @unary
    async def GetCost(self, request, context):
        by = request.by or "tenant"
        if by not in GROUPS:
            raise errors.InvalidArgument.of("by", f"{by!r} is not a grouping", ", ".join(GROUPS))
        since_s = request.since_seconds or DEFAULT_SINCE
        if not (math.isfinite(since_s) and 0 < since_s <= self.acc.ledger.keep):
            keep = self.acc.ledger.keep
            raise errors.InvalidArgument.of("since_seconds", f"{request.since_seconds!r} is out of range",
                                            f"a number of seconds in (0, {keep:g}] ({keep / 86400:g} days: "
                                            f"cost_retention_days)")
        p = auth.current()
        tenant = None if p.admin else p.tenant
        now = self.acc.clock()
        # on a reader thread (never the accounting's writes' thread), reading at most one line more than an answer holds
        lines = await self.acc.read(self.acc.ledger.query, by, now - since_s, None, tenant, MAX_LINES)
        if len(lines) > MAX_LINES:
            raise errors.InvalidArgument.of(
                "since_seconds", f"over {since_s:g} s there are more than {MAX_LINES:,} {by} lines: more than one "
                f"answer holds", f"a shorter window or a coarser `by` (at most {MAX_LINES:,} lines)")
        out = C.GetCostResponse(by=by, interval_seconds=self.acc.interval)
        out.since.FromNanoseconds(int((now - since_s) * 1e9))
        out.until.FromNanoseconds(int(now * 1e9))
        rates = self.acc.rates_by(by, tenant)
        total = C.CostLine(key="total")
        for i, ln in enumerate(lines):
            if i and i % CHUNK == 0:
                await asyncio.sleep(0)      # tens of thousands of lines: let the event loop serve other work
            cl = line(ln, rates.get(ln.key, 0.0))
            out.lines.append(cl)
            for f in ("dollars", "idle_warm_dollars", "idle_replica_dollars", "slice_seconds", "gpu_seconds",
                      "dollars_per_hour", "tokens"):
                setattr(total, f, getattr(total, f) + getattr(cl, f))
        # per 1k tokens over the groups that served tokens (slices of no model serve none)
        total.dollars_per_1k_tokens = per_1k_tokens(sum(ln.dollars for ln in out.lines if ln.tokens), total.tokens)
        out.total.CopyFrom(total)
        return out

    @unary
    async def Recommend(self, request, context):
        if request.apply and not auth.current().admin:
            raise errors.PermissionDenied("Recommend with apply needs the admin role")
        if request.limit < 0:
            raise errors.InvalidArgument.of("limit", f"{request.limit} is negative", "0 (all) or more")
        out = await self.rec.run(request.apply, request.limit, list(request.kinds), request.slice_id,
                                list(request.ids))
        if not auth.current().admin:
            # a tenant (or viewer) sees the recommendations about its own tenant's deployments and slices only
            keep = [r for r in out.recommendations if self._visible(r)]
            del out.recommendations[:]
            out.recommendations.extend(keep)
            out.saving_per_day = sum(r.saving_per_day for r in keep)
        return out

    def _visible(self, r) -> bool:
        if r.deployment:
            d = self.rec.deployments.store.deployments.get(r.deployment)
            return d is not None and auth.visible(d.spec.tenant)
        s = self.rec.ctl.fleet.slices.get(r.slice_id) if r.slice_id else None
        return s is not None and auth.visible(s.tenant)
