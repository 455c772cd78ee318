"""Deployment and replica records: in memory on the leader, durable in etcd.

`/gpumesh/v1/deployments/<name>` holds the Deployment (spec, generation, status with conditions; its
`replicas` field is left empty), `/gpumesh/v1/replicas/<name>/<replica-id>` one Replica each. Writes
go through the group-commit writer (controlplane/state/writer.py), guarded by the leader key like every
other record: a deployment is created once (Absent), replicas are written whole. The memory copy is
changed only once the write is durable, and every change wakes the watchers (`changed`).

The replicas' load signals (`Replica.load`, from the agents' telemetry) are kept in memory only: they
change every few seconds and a new leader has them again after one telemetry interval. `full` attaches
each replica's latest load when it was read from the replica's current workload; `set_load` wakes the
watchers too.
"""

from __future__ import annotations

import asyncio
import logging
import time

from controlplane.serving import loadmetrics
from controlplane.serving.replicakeys import ReplicaKeys
from controlplane.state import keys
from controlplane.controllers.slices import Controller
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)


class DeploymentStore:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.deployments: dict[str, D.Deployment] = {}
        self.replicas: dict[str, dict[str, D.Replica]] = {}    # deployment -> replica id -> replica
        self._watchers: dict[str, list[asyncio.Event]] = {}
        self.loads: dict[str, types_pb2.BackendLoad] = {}      # replica id -> its latest load (memory only)
        self.load_seen: dict[str, float] = {}                   # replica id -> when its latest load was received
        self.clock = time.time
        self.keys = ReplicaKeys(ctl)                            # replica id -> its model server's API key

    async def load(self) -> None:
        snap = await self.ctl.store.load(keys.DEPLOYMENTS)
        for key, (value, _rev, _lease) in snap.kvs.items():
            d = D.Deployment.FromString(value)
            self.deployments[keys.name_of(key, keys.DEPLOYMENTS)] = d
        snap = await self.ctl.store.load(keys.REPLICAS)
        for key, (value, _rev, _lease) in snap.kvs.items():
            r = D.Replica.FromString(value)
            self.replicas.setdefault(r.deployment, {})[r.id] = r
        await self.keys.load()
        log(logger, logging.INFO, "deployments loaded", deployments=len(self.deployments),
            replicas=sum(len(v) for v in self.replicas.values()))

    # -- watchers -----------------------------------------------------------------------------

    def subscribe(self, name: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._watchers.setdefault(name, []).append(ev)
        return ev

    def unsubscribe(self, name: str, ev: asyncio.Event) -> None:
        lst = self._watchers.get(name, [])
        if ev in lst:
            lst.remove(ev)
        if not lst:
            self._watchers.pop(name, None)      # no key left behind per name ever watched (deleted ones too)

    def changed(self, name: str) -> None:
        for ev in self._watchers.get(name, []):
            ev.set()

    def end_watches(self) -> None:
        """End every Watch stream with ABORTED ("watch again"): a standby's copy reloading or stopping (its
        promotion). Woken with the records cleared, a stream read its deployment as deleted and ended as if it
        were; left alone on a stopped copy, it sent that copy's stale record at every heartbeat for ever."""
        for lst in self._watchers.values():
            for ev in lst:
                ev.ended = True
                ev.set()

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str) -> D.Deployment:
        d = self.deployments.get(name)
        if d is None:
            raise errors.NotFound(f"no deployment {name!r}", kind="deployment", name=name)
        return d

    def replicas_of(self, name: str) -> list[D.Replica]:
        return sorted(self.replicas.get(name, {}).values(),
                      key=lambda r: (r.created_at.seconds, r.created_at.nanos, r.id))

    def full(self, name: str) -> D.Deployment:
        """The deployment with its replicas and their latest load signals (what Get answers)."""
        out = D.Deployment()
        out.CopyFrom(self.get(name))
        out.replicas.extend(self.replicas_of(name))
        for r in out.replicas:
            load = self.loads.get(r.id)
            if load is not None and r.workload_id and load.workload_id == r.workload_id:
                r.load.CopyFrom(load)
        return out

    def set_load(self, r: D.Replica, load) -> None:
        """Keep `load` (types_pb2.BackendLoad) as replica `r`'s latest, in memory, and wake the watchers."""
        self.loads[r.id] = load
        self.load_seen[r.id] = self.clock()         # its age for the autoscaler (not the agent's clock's `at`)
        loadmetrics.observe(r.deployment, r.id, load)
        self.changed(r.deployment)

    # -- writes -------------------------------------------------------------------------------

    async def create(self, d: D.Deployment) -> None:
        key = keys.deployment(d.spec.name)
        try:
            await self.ctl.writer.write([Put(key, d.SerializeToString())], [Absent(key)])
        except errors.Aborted:
            raise errors.AlreadyExists(f"deployment {d.spec.name!r} already exists") from None
        self.deployments[d.spec.name] = d
        self.changed(d.spec.name)

    async def put(self, d: D.Deployment) -> None:
        key = keys.deployment(d.spec.name)
        try:
            await self.ctl.writer.write([Put(key, d.SerializeToString())], [Present(key)])
        except errors.Aborted:
            raise errors.NotFound(f"no deployment {d.spec.name!r} (deleted meanwhile)", kind="deployment",
                                  name=d.spec.name) from None
        self.deployments[d.spec.name] = d
        self.changed(d.spec.name)

    async def put_with_replica(self, d: D.Deployment, r: D.Replica) -> None:
        """Write the deployment `d` and its replica `r` in one transaction (both must exist): a scale-down that
        names the replica it removes (ScalingOps.remove_replica) is never half written."""
        dk, rk = keys.deployment(d.spec.name), keys.replica(r.deployment, r.id)
        try:
            await self.ctl.writer.write([Put(dk, d.SerializeToString()), Put(rk, r.SerializeToString())],
                                        [Present(dk), Present(rk)])
        except errors.Aborted:
            raise errors.FailedPrecondition(f"deployment {d.spec.name!r} or its replica {r.id} was deleted "
                                            f"meanwhile") from None
        self.deployments[d.spec.name] = d
        self.replicas.setdefault(r.deployment, {})[r.id] = r
        self.changed(d.spec.name)

    async def delete(self, name: str) -> None:
        await self.ctl.writer.write([Delete(keys.deployment(name))])
        self.deployments.pop(name, None)
        self.changed(name)

    async def put_replica(self, r: D.Replica) -> None:
        """Write replica `r` whole. A replica marked TERMINATING stays so (nothing brings one back): a copy read
        before the mark (the controller's pass awaits between reading and writing it: a migrated replica following
        its workload, a crashed backend's FAILED record) keeps the mark and its message, and takes the rest (the
        slice it moved to). A mark written while this write waited, perhaps landing first, is written again."""
        r = _kept_terminating(self._replica(r), r)
        await self.ctl.writer.write([Put(keys.replica(r.deployment, r.id), r.SerializeToString())])
        now = self._replica(r)
        if now is not None and now.state == D.REPLICA_STATE_TERMINATING and r.state != now.state:
            r = _kept_terminating(now, r)
            await self.ctl.writer.write([Put(keys.replica(r.deployment, r.id), r.SerializeToString())])
        self.replicas.setdefault(r.deployment, {})[r.id] = r
        self.changed(r.deployment)

    def _replica(self, r: D.Replica) -> D.Replica | None:
        return self.replicas.get(r.deployment, {}).get(r.id)

    async def delete_replica(self, r: D.Replica) -> None:
        await self.ctl.writer.write([Delete(keys.replica(r.deployment, r.id)),
                                     Delete(keys.replica_key(r.deployment, r.id))])
        self.replicas.get(r.deployment, {}).pop(r.id, None)
        self.keys.forget(r.id)
        self.load_seen.pop(r.id, None)
        if self.loads.pop(r.id, None) is not None:
            loadmetrics.forget(r.deployment, r.id)
        if not self.replicas.get(r.deployment):
            self.replicas.pop(r.deployment, None)
        self.changed(r.deployment)


def _kept_terminating(current: D.Replica | None, r: D.Replica) -> D.Replica:
    """`r`, or a copy of it with `current`'s TERMINATING mark and message when `current` has one and `r` not."""
    if current is None or current.state != D.REPLICA_STATE_TERMINATING or r.state == current.state:
        return r
    n = D.Replica()
    n.CopyFrom(r)
    n.state, n.message = current.state, current.message
    return n
