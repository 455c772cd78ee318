"""Node lifecycle: registration, the etcd lease behind readiness, cordon and drain.

An agent's liveness is an etcd lease that the control plane keeps alive on
the agent's heartbeats; the lease holds `/alive/<node>`. When the lease
expires, etcd deletes that key, the watch here sees it, and the node turns
NotReady with its slices UNKNOWN (kept, not lost). On restart, the control
plane rebuilds everything from etcd.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref

from controlplane.state import keys
from controlplane.controllers.evictions import ReleaseDeferred, evict
from controlplane.controllers.slices import Controller, now
from controlplane.state.etcdconn import ETCD_ERRORS
from controlplane.state.store import Present, Put, cancel_watch
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
LOST_RETRY_S = 2.0           # between attempts to write a lost node's slices UNKNOWN (etcd unavailable)
NODE_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


def validate_node_name(name: str, field: str = "node_name") -> None:
    if not NODE_RE.match(name or ""):
        raise errors.InvalidArgument.of(field, f"{name!r} is not a valid node name" if name else "is required",
                                        "1-63 lowercase letters, digits, '-' or '.', starting and ending "
                                        "with a letter or digit")


def decode_node(value: bytes) -> types_pb2.Node:
    rec = types_pb2.Node()
    rec.ParseFromString(value)
    return rec


def decode_slice(value: bytes) -> types_pb2.Slice:
    s = types_pb2.Slice()
    s.ParseFromString(value)
    return s


def rebuild(ctl: Controller, snap) -> dict[str, int]:
    """Fill `ctl`'s fleet (nodes, slices, readiness) and request ids from an etcd snapshot; node name ->
    alive lease. Reads only: the leader's load (NodeManager.load) and a standby's read-only fleet
    (controlplane/state/follower.py) both start here."""
    alive: dict[str, int] = {}
    for key, (value, rev, lease) in snap.kvs.items():
        k = key.decode()
        if k.startswith(keys.NODES):
            ctl.fleet.upsert_node(decode_node(value))
        elif k.startswith(keys.ALIVE):
            alive[k[len(keys.ALIVE):]] = lease
        elif k.startswith(keys.REQUESTS):
            tenant, _, rid = k[len(keys.REQUESTS):].partition("/")
            ctl.requests.load(tenant, rid, value)
    for key, (value, rev, lease) in snap.kvs.items():
        if key.decode().startswith(keys.SLICES):
            ctl.fleet.put_slice(decode_slice(value), rev)
    ctl.revision = snap.revision
    for name, entry in ctl.fleet.nodes.items():
        entry.ready = name in alive
        entry.lease_id = alive.get(name, 0)
    return alive


class NodeManager:
    def __init__(self, ctl: Controller, lease_ttl: int = 10) -> None:
        self.ctl = ctl
        self.fleet = ctl.fleet
        self.store = ctl.store
        self.lease_ttl = lease_ttl
        self.heartbeats: dict[str, types_pb2.Node] = {}
        self._watch_task: asyncio.Task | None = None
        self._lost_tasks: dict[str, asyncio.Task] = {}      # node -> retrying its slices' UNKNOWN write
        self._record_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def record_lock(self, name: str) -> asyncio.Lock:
        """Held by every writer of a node's record (register, cordon, the deletion's marker and last
        transaction) from reading `entry.record` until its write is adopted: each writes a whole copy of the
        record, so two interleaved writers would put back what the other changed (a cordon's copy taken before
        the marker lands erases `deleting`). One leader writes these keys, so a lock in this process orders
        them. Kept only while held or awaited."""
        lock = self._record_locks.get(name)
        if lock is None:
            lock = self._record_locks[name] = asyncio.Lock()
        return lock

    # -- start: rebuild from etcd ----------------------------------------------------------

    async def load(self) -> None:
        snap = await self.store.load()
        rebuild(self.ctl, snap)
        log(logger, logging.INFO, "state loaded from etcd", revision=snap.revision, nodes=len(self.fleet.nodes),
            slices=len(self.fleet.slices), ready=sum(1 for n in self.fleet.nodes.values() if n.ready))
        self._watch_task = asyncio.create_task(self._watch_alive(snap.revision + 1), name="alive-watch")
        for name, entry in list(self.fleet.nodes.items()):
            if entry.record.deleting:       # a deletion cut short: finished by controllers/nodedelete.py
                self.ctl.deleted_nodes.add(name)
            if not entry.ready:
                await self.ctl.mark_node_lost(name, "no lease at control-plane start")

    async def stop(self) -> None:
        for t in self._lost_tasks.values():
            t.cancel()
        if self._watch_task:
            self._watch_task.cancel()
            await asyncio.wait({self._watch_task}, timeout=STOP_TIMEOUT_S)   # ends at once; a bound all the same

    async def _watch_alive(self, start_revision: int) -> None:
        while True:
            watch = None
            try:
                watch = await self.store.watch_prefix(keys.ALIVE, start_revision)
                async for ev in watch:
                    start_revision = ev.kv.mod_revision + 1
                    if ev.kind == "DELETE":
                        await self._lease_lost(keys.name_of(ev.kv.key, keys.ALIVE))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd's, the mesh's, or a bug in one node's handling:
                # the watch goes on (ended, no node would ever be marked NotReady again on this leader)
                log(logger, logging.WARNING, "alive watch interrupted; re-reading the leases", error=repr(e))
                await asyncio.sleep(1)
                try:
                    start_revision = await self._relist_alive()
                except Exception as e2:  # noqa: BLE001 - as above
                    log(logger, logging.WARNING, "re-reading the leases failed; retrying", error=repr(e2))
            finally:
                if watch is not None:
                    await cancel_watch(watch)

    async def _relist_alive(self) -> int:
        """After a broken watch: the revisions it missed may be compacted away (etcd's auto-compaction), so
        the watch cannot resume from where it was. Read the alive keys as they are now, mark lost every node
        that was ready and has no key any more, and return the revision to watch from."""
        snap = await self.store.load(keys.ALIVE)
        alive = {keys.name_of(k, keys.ALIVE) for k in snap.kvs}
        for name, entry in list(self.fleet.nodes.items()):
            if entry.ready and name not in alive:
                await self._lease_lost(name)
        return snap.revision + 1

    async def _lease_lost(self, name: str) -> None:
        entry = self.fleet.nodes.get(name)
        if entry is None or not entry.ready:
            return
        entry.ready = False
        entry.lease_id = 0
        entry.record.message = "lease expired"
        log(logger, logging.WARNING, "node NotReady: lease expired", node=name)
        self.ctl.recorder.emit("Node", name, "Warning", "NodeNotReady", "lease expired: the agent stopped "
                               "heartbeating; its slices are UNKNOWN", node=name, source="node-controller")
        session = self.ctl.sessions.get(name)
        if session is not None:
            self.ctl.sessions.close(session)
        try:
            await self.ctl.mark_node_lost(name, "lease expired")
        except errors.MeshError as e:
            # the node reads NotReady from here on, so neither this watch nor a re-read of the leases would
            # ask again: its slices stayed READY (their workloads RUNNING) until the next leader's start
            log(logger, logging.WARNING, "lost node's slices not marked UNKNOWN yet; retrying", node=name,
                error=str(e))
            if name not in self._lost_tasks:
                self._lost_tasks[name] = asyncio.create_task(self._mark_lost(name), name=f"node-lost-{name}")

    async def _mark_lost(self, name: str) -> None:
        """Write a lost node's slices UNKNOWN until etcd takes it, unless the node came back (registered) or
        went (deleted) meanwhile."""
        try:
            while True:
                await asyncio.sleep(LOST_RETRY_S)
                entry = self.fleet.nodes.get(name)
                if entry is None or entry.ready:
                    return
                try:
                    await self.ctl.mark_node_lost(name, "lease expired")
                    return
                except errors.MeshError as e:
                    log(logger, logging.WARNING, "lost node's slices not marked UNKNOWN yet; retrying", node=name,
                        error=str(e))
        finally:
            self._lost_tasks.pop(name, None)

    # -- agent-facing --------------------------------------------------------------------

    def _refuse_deleting(self, name: str) -> None:
        if name in getattr(self.ctl, "deleted_nodes", ()):
            raise errors.FailedPrecondition(f"node {name!r} is being deleted (meshctl delete node): it registers "
                                            f"again as a new node once the deletion has finished")

    async def register(self, name: str, inventory: types_pb2.NodeInventory, agent_version: str) -> types_pb2.Node:
        validate_node_name(name)
        self._refuse_deleting(name)
        entry = self.fleet.nodes.get(name)
        lease_id = entry.lease_id if entry is not None and entry.ready else 0
        if lease_id:
            try:
                if await self.store.refresh_lease(lease_id) <= 0:
                    lease_id = 0
            except ETCD_ERRORS:
                lease_id = 0
        if not lease_id:
            try:
                lease_id = await self.store.grant_lease(self.lease_ttl)
            except ETCD_ERRORS as e:
                raise errors.Unavailable(f"etcd: cannot grant a lease: {e}") from e
        async with self.record_lock(name):
            # read again after the awaits: a deletion that began meanwhile wins (its marker is written guarded by
            # the absence of the alive key; this write, queued after it, would bring the node back half-deleted),
            # and a node deleted meanwhile registers as a new one, nothing of its old record kept
            self._refuse_deleting(name)
            entry = self.fleet.nodes.get(name)
            rec, at = types_pb2.Node(), now()
            if entry is not None:
                rec.CopyFrom(entry.record)
            else:
                rec.name = name
                rec.registered_at.CopyFrom(at)
            rec.agent_registered_at.CopyFrom(at)
            rec.inventory.CopyFrom(inventory)
            rec.agent_version = agent_version
            rec.state = types_pb2.NODE_STATE_READY
            rec.message = ""
            await self.ctl.writer.write([Put(keys.node(name), rec.SerializeToString()),
                                         Put(keys.alive(name), name.encode(), lease=lease_id)])
            was = "new" if entry is None else ("ready" if entry.ready else "not-ready")
            entry = self.fleet.upsert_node(rec)
        if was != "ready":
            self.ctl.recorder.emit("Node", name, "Normal", "Registered" if was == "new" else "NodeReady",
                                   f"{agent_version or 'agent'} registered with {len(inventory.gpus)} GPU(s)",
                                   node=name, source="node-controller")
        entry.ready = True
        entry.lease_id = lease_id
        self.heartbeats[name] = now()
        log(logger, logging.INFO, "node registered", node=name, gpus=len(inventory.gpus), lease=lease_id)
        return self.view(name)

    async def heartbeat(self, name: str) -> int:
        entry = self.fleet.nodes.get(name)
        if entry is None or not entry.lease_id:
            raise errors.NotFound(f"node {name!r} is not registered (or its lease expired): register again",
                                  kind="node", name=name)
        try:
            ttl = await self.store.refresh_lease(entry.lease_id)
        except ETCD_ERRORS as e:
            raise errors.Unavailable(f"etcd: cannot refresh the lease: {e}") from e
        if ttl <= 0:
            await self._lease_lost(name)
            raise errors.NotFound(f"the lease of node {name!r} expired: register again", kind="node", name=name)
        self.heartbeats[name] = now()
        return ttl

    # -- admin ---------------------------------------------------------------------------

    def entry(self, name: str):
        entry = self.fleet.nodes.get(name)
        if entry is None:
            raise errors.NotFound(f"no node {name!r}", kind="node", name=name)
        return entry

    def _refuse_being_deleted(self, name: str) -> None:
        """An admin change of a node being deleted (its marker written or being written) is refused: the
        deletion ends what runs on it, and its record goes."""
        if name in getattr(self.ctl, "deleted_nodes", ()):
            raise errors.FailedPrecondition(f"node {name} is being deleted (meshctl delete node): it can no longer "
                                            f"be cordoned, uncordoned or drained")

    def view(self, name: str) -> types_pb2.Node:
        entry = self.entry(name)
        n = types_pb2.Node()
        n.CopyFrom(entry.record)
        n.state = types_pb2.NODE_STATE_READY if entry.ready else types_pb2.NODE_STATE_NOT_READY
        if not entry.ready and not n.message:
            n.message = "lease expired"
        slices = self.fleet.slices_on(name)
        n.slices = len(slices)
        n.ready_slices = sum(1 for s in slices if s.state == types_pb2.SLICE_STATE_READY)
        hb = self.heartbeats.get(name)
        if hb is not None:
            n.last_heartbeat.CopyFrom(hb)
        telemetry = getattr(self.ctl, "telemetry", None)
        if telemetry is not None:
            n.events.extend(telemetry.events_of(name))
            n.ib_ports.extend(telemetry.ib_ports.get(name, ()))
        return n

    async def set_cordon(self, name: str, cordoned: bool, draining: bool | None = None) -> types_pb2.Node:
        """Cordon or uncordon; `draining` (default: cleared by an uncordon, kept by a cordon) marks a
        drain in progress, which the deployment controller acts on. Refused for a node being deleted; the
        write is guarded by the record's presence, so it never brings back a node deleted meanwhile."""
        async with self.record_lock(name):
            entry = self.entry(name)                # read again under the lock: the record as it is now
            self._refuse_being_deleted(name)
            if draining is None:
                draining = entry.record.draining and cordoned
            changed = entry.record.cordoned != cordoned or entry.record.draining != draining
            if changed:
                rec = types_pb2.Node()
                rec.CopyFrom(entry.record)
                rec.cordoned = cordoned
                rec.draining = draining
                try:
                    await self.ctl.writer.write([Put(keys.node(name), rec.SerializeToString())],
                                                [Present(keys.node(name))])
                except errors.Aborted:
                    raise errors.NotFound(f"no node {name!r} (deleted meanwhile)", kind="node", name=name) from None
                entry.record = rec
        if changed:
            log(logger, logging.INFO, "node cordoned" if cordoned else "node uncordoned", node=name,
                draining=draining)
            self.ctl.recorder.emit("Node", name, "Normal", "Cordoned" if cordoned else "Uncordoned",
                                   "marked unschedulable" if cordoned else "marked schedulable", node=name,
                                   source="node-controller")
        return self.view(name)

    async def drain(self, name: str, dry_run: bool) -> tuple[types_pb2.Node, list[types_pb2.Slice],
                                                              list[types_pb2.Slice]]:
        """Cordon, migrate what can migrate, evict the rest; (node, evicted, replacing). The slices of
        deployment replicas are not evicted: the deployment controller replaces each replica elsewhere
        first and releases the old slice once the replacement is READY (controlplane/serving/)."""
        self.entry(name)
        self._refuse_being_deleted(name)
        deployments = getattr(self.ctl, "deployments", None)
        kept = deployments.replica_slices(name) if deployments is not None else set()
        victims = [s for s in self.fleet.slices_on(name) if s.state != types_pb2.SLICE_STATE_RELEASING]
        replacing = [s for s in victims if s.id in kept]
        victims = [s for s in victims if s.id not in kept]
        if dry_run:
            return self.view(name), victims, replacing
        await self.set_cordon(name, True, draining=True)
        if deployments is not None:
            deployments.kick()
        migrations = getattr(self.ctl, "migrations", None)
        if migrations is not None:      # move what can migrate first (controlplane/controllers/migrations.py)
            await migrations.drain(name, skip_slices=kept)
        evicted, deferred, why = [], [], f"evicted: node {name} drained"
        for alloc in sorted({s.allocation_id for s in victims}):
            try:
                evicted += await self.ctl.release(alloc, wait=False, message=why)
            except ReleaseDeferred:     # a resize's old placement: after the rest, once the resize released it
                deferred.append(alloc)
            except errors.NotFound:     # released by its tenant and gone since the drain listed it
                continue
        for alloc in deferred:
            try:
                evicted += await evict(self.ctl, alloc, why, self.ctl.evict_wait)
            except ReleaseDeferred as e:    # left to its resize, which releases it when it ends
                log(logger, logging.WARNING, "drain: a slice is left to its resize", node=name, allocation=alloc,
                    error=str(e))
        self.ctl.recorder.emit("Node", name, "Normal", "Drained", f"drained: {len(evicted)} slice(s) evicted",
                               node=name, source="node-controller")
        for s in evicted:
            self.ctl.recorder.emit("Slice", s.id, "Warning", "Evicted", f"node {name} drained", tenant=s.tenant,
                                   node=name, source="node-controller")
        return self.view(name), evicted, replacing
