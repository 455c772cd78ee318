"""Pool: a request labelled with a resource pool (mesh/pools.py LABEL) goes only to GPUs the pool selects
(GPU models, isolation kinds, node labels) and only while the pool's quota has room; a refusal names the
pool and the limit ("PoolExhausted: pool "a" quota max_slices=2 reached").

The pools are handed in by the pool store (controlplane/pools/store.py `attach`), which also calls
`on_change` (the framework's cache invalidation) when one changes. A request of a pool this plugin does not
know is refused (the pool was deleted after the deployment was made). The pre-filter judges the least a slice
can take on the pool's GPU models (never refusing what `permit` allows); `permit` checks what the slices chosen
take (their GPU model and sharing kind may charge more)."""

from __future__ import annotations

from controlplane.state.fleet import Fleet, GpuState, NodeEntry
from controlplane.scheduler.framework import SUCCESS, Code, CycleState, Status
from mesh import pools as P
from mesh.cost import PriceTable, slice_share
from mesh.slicespec import ISOLATION_ENUM, SliceRequest

NAME = "Pool"


class Plugin:
    NAME = NAME
    cacheable = False      # node labels are not in the node's signature

    def __init__(self) -> None:
        self.pools: dict = {}              # name -> gpumesh.v1.Pool
        self.prices = PriceTable()
        self.on_change = None              # set by the framework

    def set_pools(self, pools: dict, prices: PriceTable | None = None) -> None:
        self.pools = pools
        if prices is not None:
            self.prices = prices
        if self.on_change is not None:
            self.on_change()

    def relevant(self, req: SliceRequest) -> bool:
        return P.LABEL in req.labels

    def _pool(self, req: SliceRequest):
        name = req.labels.get(P.LABEL)
        return None if name is None else self.pools.get(name)

    @staticmethod
    def _source(req: SliceRequest, fleet: Fleet):
        """The slice of the pool that `req` replaces while its move is live (a migration's or a resize's target:
        the two count once, at the larger; mesh/replacing.py), or None."""
        src = fleet.replaced(req)
        return src if src is not None and src.labels.get(P.LABEL) == req.labels.get(P.LABEL) else None

    def estimate(self, pool, req: SliceRequest, fleet: Fleet) -> tuple[float, float]:
        """The least GPU-equivalents and the least dollars per hour one slice of `req` can be charged (each a
        bound of its own) on the pool's GPU models present in the fleet, in MIG mode or not: `slice_share` of
        what NodeResourcesFit would give it there, as `permit` counts it. (It used to count a MIG profile named
        without memory as a whole GPU, a MIG-capable model only in MIG mode, and a time-share slice at its
        compute share rather than the memory it is charged for: refusing what the permit step allows.)"""
        models = {g.model.name: g.model for e in fleet.nodes.values() for g in e.gpus
                  if not pool.selector.gpu_models or g.model.name in pool.selector.gpu_models}
        shares, dollars = [], []
        for m in models.values():
            options = []
            if m.mig_capable and req.isolation in (None, "mig"):
                # the profile asked for, else the smallest that holds the memory (the scheduler's may be larger:
                # it also asks the compute share)
                p = next((p for p in m.mig_profiles if p.name == req.mig_profile), None) if req.mig_profile \
                    else m.smallest_profile_for(req.memory_bytes, 0.0)
                if p is not None:
                    options.append(slice_share(ISOLATION_ENUM["mig"], m.name, profile=p.name))
            if req.isolation != "mig":
                options.append(slice_share(ISOLATION_ENUM[req.isolation or "timeshare"], m.name,
                                           memory_bytes=req.memory_bytes, compute_share=req.compute_share))
            if options:
                shares.append(min(options))
                dollars.append(shares[-1] * self.prices.gpu_hour(m.name))
        return min(shares, default=0.0), min(dollars, default=0.0)

    def pre_filter(self, state: CycleState, req: SliceRequest, fleet: Fleet) -> Status:
        name = req.labels.get(P.LABEL)
        if name is None:
            return SUCCESS
        pool = self.pools.get(name)
        if pool is None:
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("pool", f"PoolNotFound: no pool {name!r}"),), NAME)
        used = P.usage(name, fleet.slices.values(), self.prices, fleet.replaced)
        gpus, dollars = self.estimate(pool, req, fleet)
        more = P.request_beyond(self._source(req, fleet), self.prices, req.count, req.memory_bytes * req.count,
                                gpus * req.count, dollars * req.count)
        why = P.refusal(pool, used, *more)
        if why is not None:
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("pool", why),), NAME)
        return SUCCESS

    def permit(self, state: CycleState, req: SliceRequest, fleet: Fleet, choices: list, victims=()) -> Status:
        """The pool's quota on the placement chosen (`choices`, once the allocations `victims` are evicted)."""
        pool = self._pool(req)
        if pool is None or not choices:
            return SUCCESS
        gone = set(victims)
        used = P.usage(pool.name, (s for s in fleet.slices.values() if s.allocation_id not in gone), self.prices,
                       fleet.replaced)
        gpus = dollars = 0.0
        for c in choices:
            share = slice_share(ISOLATION_ENUM.get(c.isolation, 0), c.gpu_model, profile=c.profile or "",
                                memory_bytes=c.memory_bytes, compute_share=c.compute_share)
            gpus += share
            dollars += share * self.prices.gpu_hour(c.gpu_model)
        source = self._source(req, fleet)
        if source is not None and source.allocation_id in gone:
            source = None
        why = P.refusal(pool, used, *P.request_beyond(source, self.prices, len(choices),
                                                      sum(c.memory_bytes for c in choices), gpus, dollars))
        if why is not None:
            return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE, (("pool", why),), NAME)
        return SUCCESS

    def filter(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> Status:
        pool = self._pool(req)
        if pool is None or P.selects_node(pool, node.record.inventory.labels):
            return SUCCESS
        why = f"node:not in pool {pool.name!r} (node labels)"
        return Status(Code.UNSCHEDULABLE_AND_UNRESOLVABLE,
                      tuple((g.model.name, why[5:]) for g in node.gpus) or (("host", why),), NAME)

    def filter_gpu(self, req: SliceRequest, gpu: GpuState) -> str | None:
        pool = self._pool(req)
        if pool is None:
            return None
        return P.selects_gpu(pool, gpu.model.name, gpu.mig_enabled, req.isolation)
