"""The pool store: pools in etcd under `/gpumesh/v1/pools/<name>`, loaded by the leader and kept in memory.

Writes go through the group-commit writer (controlplane/state/writer.py) guarded like the model registry's
(Create: the key absent; Update, Delete: present). Every change is handed to the scheduler's Pool plugin
(controlplane/scheduler/plugins/pool.py), which enforces the selector and quota on each placement; `view`
adds the usage now (slices labelled with the pool, the capacity the selector matches, what is left) for Get
and List, which is what an autoscaler reads to know its room.

A pool's events (kind `Pool`, controlplane/events/, shown by `meshctl describe pool`): `Created`, `Updated` (what
changed) and `Deleted`, of no tenant (an admin's, as the pool's tenants are); and, through `held`, what its quota
holds back: a replica it refuses (`PoolExhausted`, from the deployment controller) and an autoscaler's scale-up it
caps (`PoolLimit`), each of the held deployment's tenant.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf import json_format

from controlplane.controllers.slices import now
from controlplane.state import keys
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import pool_service_pb2 as P
from mesh import errors, pools
from mesh.cost import PriceTable
from mesh.logs import log

logger = logging.getLogger(__name__)
SOURCE = "pool-service"


def _fields(p: P.Pool) -> dict[str, str]:
    """What an operator set of pool `p` (no times, generation or usage), flattened and as text:
    {"quota.max_slices": "2", "selector.isolations": "mps", ...}; a field left unset is absent."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and prefix != "selector.node_labels":
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, dict):
            out[prefix] = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        elif isinstance(value, list):
            out[prefix] = ",".join(str(v) for v in value)
        else:
            out[prefix] = f"{value:g}" if isinstance(value, float) else str(value)
    d = json_format.MessageToDict(p, preserving_proto_field_name=True)
    for k in ("name", "created_at", "updated_at", "generation", "usage"):
        d.pop(k, None)
    if p.selector.isolations:
        d["selector"]["isolations"] = [pools.ISOLATIONS.get(i, str(i)) for i in p.selector.isolations]
    walk("", d)
    return out


def _summary(p: P.Pool) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(_fields(p).items())) or "selects every GPU, no quota"


def _changes(old: P.Pool, new: P.Pool) -> str:
    a, b = _fields(old), _fields(new)
    return ", ".join(f"{k} {a.get(k, 'unset')} -> {b.get(k, 'unset')}" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k)) or "nothing changed"


class PoolStore:
    def __init__(self, ctl, prices: PriceTable) -> None:
        self.ctl = ctl
        self.prices = prices
        self.pools: dict[str, P.Pool] = {}
        self.deployments = None            # DeploymentManager, for "deployments drawing from it"
        self._lock = asyncio.Lock()
        ctl.pools = self

    @property
    def lock(self) -> asyncio.Lock:
        """Held by Create, Update and Delete; a deployment's Create holds it while it checks its pool and writes
        (a Delete checks the pool's users, then writes: a deployment created in between drew from no pool)."""
        return self._lock

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.POOLS)
        self.pools.clear()
        for key, (value, _rev, _lease) in snap.kvs.items():
            self.pools[keys.name_of(key, keys.POOLS)] = P.Pool.FromString(value)
        self._publish()
        log(logger, logging.INFO, "pools loaded", pools=len(self.pools))

    def _publish(self) -> None:
        """Hand the pools to the scheduler's Pool plugin (absent from a custom profile: pools not enforced)."""
        sched = getattr(self.ctl, "scheduler", None)
        try:
            plugin = sched.plugin("Pool") if sched is not None else None
        except KeyError:
            plugin = None
        if plugin is None:
            if self.pools:
                log(logger, logging.WARNING, "the scheduler profile has no Pool plugin: pool quotas not enforced")
            return
        plugin.set_pools(dict(self.pools), self.prices)

    # -- events -------------------------------------------------------------------------------

    def event(self, name: str, type: str, reason: str, message: str, tenant: str = "",
              source: str = SOURCE) -> None:
        """A durable event of pool `name` (never raises; nothing where the control plane records none)."""
        recorder = getattr(self.ctl, "recorder", None)
        if recorder is not None:
            recorder.emit("Pool", name, type, reason, message[:1000], tenant=tenant, source=source)

    def held(self, name: str, reason: str, deployment: str, tenant: str, why: str, source: str) -> None:
        """Pool `name`'s quota holds back deployment `deployment` (of `tenant`): a Warning `reason` on the pool,
        which the deployment's tenant sees too. The caller sends it once per episode."""
        if name in self.pools:
            self.event(name, "Warning", reason, f"deployment {deployment}: {why}", tenant, source)

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str) -> P.Pool:
        pools.check_name(name, "name")
        p = self.pools.get(name)
        if p is None:
            raise errors.NotFound(f"no pool {name!r}", kind="pool", name=name)
        return p

    def drawing(self, name: str, visible_only: bool = False) -> list[str]:
        """The deployments that name the pool (`visible_only`: those the caller may see)."""
        dm = self.deployments
        if dm is None:
            return []
        from controlplane.api import auth
        return sorted(n for n, d in dm.store.deployments.items()
                      if d.spec.pool == name and (not visible_only or auth.visible(d.spec.tenant)))

    def view(self, p: P.Pool) -> P.Pool:
        """`p` with its usage now."""
        out = P.Pool()
        out.CopyFrom(p)
        fleet = self.ctl.fleet
        used = pools.usage(p.name, fleet.slices.values(), self.prices, fleet.replaced)     # a move's pair: once
        u = out.usage
        u.slices, u.gpus, u.memory_bytes, u.dollars_per_hour = (used.slices, used.gpus, used.memory_bytes,
                                                                 used.dollars_per_hour)
        cap_gpus, cap_mem, free_mem, free_gpus = 0, 0, 0, 0.0
        for e in self.ctl.fleet.nodes.values():
            if not e.schedulable or not pools.selects_node(p, e.record.inventory.labels):
                continue
            for g in e.gpus:
                if pools.holds_gpu(p, g.model, g.mig_enabled):
                    cap_gpus += 1
                    cap_mem += g.memory_bytes
                    # what is still free on it, whoever holds the rest (this pool or not)
                    free = max(0, g.memory_bytes - g.allocated_memory)
                    free_mem += free
                    free_gpus += free / g.memory_bytes if g.memory_bytes else 0.0
        u.capacity_gpus, u.capacity_memory_bytes = cap_gpus, cap_mem
        q = p.quota

        def least(*values):
            known = [v for v in values if v >= 0]
            return min(known) if known else -1
        u.available_slices = int(pools.room(q.max_slices, used.slices))
        u.available_gpus = least(pools.room(q.max_gpus, used.gpus), free_gpus)
        u.available_memory_bytes = int(least(pools.room(q.max_memory_bytes, used.memory_bytes), free_mem))
        u.available_dollars_per_hour = pools.room(q.max_dollars_per_hour, used.dollars_per_hour)
        u.deployments.extend(self.drawing(p.name, visible_only=True))   # a tenant sees only its own
        return out

    def room(self, name: str, need_bytes: int, replica_cost_per_hour: float) -> int | None:
        """How many more replicas of `need_bytes` (costing `replica_cost_per_hour` each) the pool's quota and
        capacity admit now; None when the pool is unknown or nothing bounds it (the autoscaler's pool_room)."""
        p = self.pools.get(name)
        if p is None:
            return None
        u = self.view(p).usage
        bounds = []
        if u.available_slices >= 0:
            bounds.append(u.available_slices)
        if u.available_memory_bytes >= 0 and need_bytes > 0:
            bounds.append(u.available_memory_bytes // need_bytes)
        if u.available_dollars_per_hour >= 0 and replica_cost_per_hour > 0:
            bounds.append(int(u.available_dollars_per_hour / replica_cost_per_hour + 1e-9))
        return int(min(bounds)) if bounds else None

    def list(self) -> list[P.Pool]:
        return [self.view(p) for _, p in sorted(self.pools.items())]

    # -- writes -------------------------------------------------------------------------------

    async def create(self, pool: P.Pool) -> P.Pool:
        p = pools.validate(pool)
        async with self._lock:
            if p.name in self.pools:
                raise errors.AlreadyExists(f"pool {p.name!r} already exists: update it, or delete it first")
            p.created_at.CopyFrom(now())
            p.updated_at.CopyFrom(p.created_at)
            p.generation = 1
            try:
                await self.ctl.writer.write([Put(keys.pool(p.name), p.SerializeToString())],
                                            [Absent(keys.pool(p.name))])
            except errors.Aborted:
                raise errors.AlreadyExists(f"pool {p.name!r} already exists") from None
            self.pools[p.name] = p
            self._publish()
        log(logger, logging.INFO, "pool created", pool=p.name)
        self.event(p.name, "Normal", "Created", _summary(p))
        return self.view(p)

    async def update(self, pool: P.Pool) -> P.Pool:
        p = pools.validate(pool)
        if pool.generation < 0:
            raise errors.InvalidArgument.of("pool.generation", f"{pool.generation} is negative",
                                            "0 (no check) or the generation the change was read at")
        async with self._lock:
            old = self.get(p.name)
            if pool.generation and pool.generation != old.generation:
                raise errors.Aborted(f"pool {p.name!r} is at generation {old.generation}, not {pool.generation}")
            p.created_at.CopyFrom(old.created_at)
            p.updated_at.CopyFrom(now())
            p.generation = old.generation + 1
            try:
                await self.ctl.writer.write([Put(keys.pool(p.name), p.SerializeToString())],
                                            [Present(keys.pool(p.name))])
            except errors.Aborted:
                self.pools.pop(p.name, None)
                raise errors.NotFound(f"no pool {p.name!r} (deleted meanwhile)", kind="pool", name=p.name) from None
            self.pools[p.name] = p
            self._publish()
        log(logger, logging.INFO, "pool updated", pool=p.name, generation=p.generation)
        self.event(p.name, "Normal", "Updated", f"generation {p.generation}: {_changes(old, p)}")
        return self.view(p)

    async def delete(self, name: str) -> P.Pool:
        async with self._lock:
            p = self.get(name)
            users = self.drawing(name)
            if users:
                raise errors.FailedPrecondition(f"pool {name!r} is in use by deployment(s) {', '.join(users)}: "
                                                f"delete them first")
            out = self.view(p)
            try:
                await self.ctl.writer.write([Delete(keys.pool(name))], [Present(keys.pool(name))])
            except errors.Aborted:
                pass
            self.pools.pop(name, None)
            self._publish()
        log(logger, logging.INFO, "pool deleted", pool=name)
        self.event(name, "Normal", "Deleted", f"deleted ({out.usage.slices} slice(s) of it still placed)"
                   if out.usage.slices else "deleted")
        return out
