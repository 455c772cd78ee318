"""A standby's read-only fleet: loaded from etcd, kept current by a watch, serving the read RPCs.

A control plane that does not lead (controlplane/controllers/standby.py) still answers reads:
SliceService Get/List/Watch, AdminService ListNodes/GetNode/ListGpus,
WorkloadService Get/List, MeshService Get/List/ListGrants, MigrationService
Get/List/ListCheckpoints, ModelService Get/List, EventService List/Watch and DeploymentService Get/List/Watch
(deployments with their replicas, as the leader stores them; a Watch re-sends a deployment on every change of
it or of a replica). The
`Follower` builds its fleet with the leader's own decoding
(`controlplane.controllers.nodes.rebuild`, the first step of NodeManager.load), then
follows one prefix watch on `/gpumesh/v1/` from the snapshot's revision,
applying puts and deletes of nodes, alive keys (readiness) and slices, and
publishing slice events for Watch streams. The servicers are the leader's
classes over this fleet, so authorization (tenant scoping, NOT_FOUND for
another tenant's objects) is the same; writes and agent streams are never
routed here (standby.READS lists what is).

It never writes to etcd. A broken watch (etcd unreachable, compaction) reloads
the whole snapshot into a fresh fleet and cuts open Watch streams (their
clients watch again). On promotion the control plane stops the follower and
does the leader's full load.
"""

from __future__ import annotations

import asyncio
import io
import logging

from controlplane.state import keys
from controlplane.controllers.slices import Controller
from controlplane.api.events import ADDED, DELETED, MODIFIED
from controlplane.state.fleet import Fleet
from controlplane.api.meshsvc import MeshManager, MeshService
from controlplane.controllers.migrations import MigrationManager
from controlplane.api.migrationsvc import MigrationService
from controlplane.controllers.nodes import NodeManager, decode_node, decode_slice, rebuild
from controlplane.serving.deploystore import DeploymentStore
from controlplane.serving.deploysvc import DeploymentService
from controlplane.serving.registry import ModelRegistry, ModelService
from controlplane.api.services import AdminService, SliceService
from controlplane.controllers.workloads import WorkloadManager, WorkloadService
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import model_service_pb2 as MR
from gpumesh.v1 import migration_service_pb2 as MS
from gpumesh.v1 import types_pb2
from controlplane.state.store import EtcdStore, cancel_watch
from controlplane.events.log import EventLog
from controlplane.events.service import EventService
from gpumesh.v1 import event_service_pb2 as EV
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)


class DeploymentRecords:
    """What DeploymentService's reads use of the leader's DeploymentManager: its store, here filled
    from etcd by the follower and never written."""

    def __init__(self, ctl: Controller) -> None:
        self.store = DeploymentStore(ctl)

    def clear(self) -> None:
        self.store.end_watches()            # a reload: open Watch streams watch again, not read a deletion
        names = set(self.store.deployments) | set(self.store.replicas)
        self.store.deployments.clear()
        self.store.replicas.clear()
        for name in names:
            self.store.changed(name)

    def apply(self, deleted: bool, key: str, value: bytes) -> bool:
        """A deployment or replica record; False for any other key."""
        st = self.store
        if key.startswith(keys.DEPLOYMENTS):
            name = key[len(keys.DEPLOYMENTS):]
            if deleted:
                st.deployments.pop(name, None)
            else:
                st.deployments[name] = D.Deployment.FromString(value)
        elif key.startswith(keys.REPLICAS):
            name, _, rid = key[len(keys.REPLICAS):].partition("/")
            if deleted:
                st.replicas.get(name, {}).pop(rid, None)
                if not st.replicas.get(name):
                    st.replicas.pop(name, None)
            else:
                st.replicas.setdefault(name, {})[rid] = D.Replica.FromString(value)
        else:
            return False
        st.changed(name)
        return True


STOP_TIMEOUT_S = 5.0


class Follower:
    def __init__(self, store: EtcdStore, lease_ttl: int = 10, retry: float = 0.5) -> None:
        self.store = store
        self.ctl = Controller(store)          # its writer is never started: nothing here writes
        self.nodes = NodeManager(self.ctl, lease_ttl=lease_ttl)
        # the leader's managers as record holders only: never loaded, started or given a stream
        self.workloads = WorkloadManager(self.ctl)
        self.mesh = MeshManager(self.ctl)
        self.migrations = MigrationManager(self.ctl, self.workloads)
        self.models = ModelRegistry(self.ctl)
        self.event_log = EventLog()
        self.deployments = DeploymentRecords(self.ctl)
        self.services = {"EventService": EventService(self.event_log), "ModelService": ModelService(self.models),
                         "DeploymentService": DeploymentService(self.deployments),
                         "SliceService": SliceService(self.ctl), "AdminService": AdminService(self.ctl, self.nodes),
                         "WorkloadService": WorkloadService(self.workloads), "MeshService": MeshService(self.mesh),
                         "MigrationService": MigrationService(self.migrations)}
        self.retry = retry
        self.loaded = asyncio.Event()
        self.applied = 0                      # watch events applied (tests and logs)
        self.reloads = 0
        self.stop_overruns = 0                # stops whose watch did not end within STOP_TIMEOUT_S (must stay 0)
        self._alive: dict[str, int] = {}      # alive keys seen before their node record
        self._task: asyncio.Task | None = None

    def reader(self, service: str):
        """The read-only servicer of `service` once the first snapshot is loaded; else None."""
        return self.services.get(service) if self.loaded.is_set() else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="follower-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A safety net only: the task ends at once (store.watch_prefix re-raises a cancel that aetcd's watch
            # creation swallowed, the cause of the hangs once seen here); a shutdown must not hang if it ever
            # does not, and the warning says where the task was stuck.
            done, _ = await asyncio.wait({self._task}, timeout=STOP_TIMEOUT_S)
            if not done:
                self.stop_overruns += 1
                stack = io.StringIO()
                self._task.print_stack(file=stack)
                log(logger, logging.WARNING, "standby: the etcd watch did not end on stop; leaving it",
                    seconds=STOP_TIMEOUT_S, stack=stack.getvalue())
            self._task = None
        self.ctl.events.end_all()     # open Watch streams: watch again (at the leader)
        self.event_log.end_all()
        self.deployments.store.end_watches()

    # -- load and follow ---------------------------------------------------------------------

    async def _load(self) -> int:
        snap = await self.store.load()
        if self.loaded.is_set():
            # A reload: a fresh fleet (what was missed is unknown), open Watch streams cut off.
            self.reloads += 1
            fleet = Fleet()
            fleet.reservation_live = self.ctl.fleet.reservation_live     # the migration manager's (a move's pair)
            self.ctl.fleet = self.nodes.fleet = fleet
            self.ctl.requests.clear()
            self.ctl.events.end_all()
            self.event_log.end_all()
        self.event_log.clear()
        self._alive = rebuild(self.ctl, snap)
        for key, (value, _rev, _lease) in snap.kvs.items():
            if key.startswith(keys.GPU_HEALTH.encode()):
                self._apply_health(False, key.decode(), value)
        self.workloads.workloads.clear()
        self.mesh.connections.clear()
        self.mesh.grants.clear()
        self.migrations.migrations.clear()
        self.migrations.checkpoints.clear()
        self.models.models.clear()
        self.deployments.clear()
        for key, (value, _rev, _lease) in snap.kvs.items():
            self._apply_record(False, key.decode(), value)
        self.loaded.set()
        log(logger, logging.INFO, "standby: read-only fleet loaded from etcd", revision=snap.revision,
            nodes=len(self.ctl.fleet.nodes), slices=len(self.ctl.fleet.slices))
        return snap.revision

    async def _run(self) -> None:
        while True:
            watch = None
            try:
                revision = await self._load()
                watch = await self.store.watch_prefix(keys.PREFIX, revision + 1)
                async for ev in watch:
                    self.apply(ev.kind == "DELETE", ev.kv.key.decode(), ev.kv.value, ev.kv.mod_revision,
                               ev.kv.lease)
                raise errors.Unavailable("the etcd watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd errors and anything else: reload and follow again
                log(logger, logging.WARNING, "standby: etcd watch interrupted; reloading", error=str(e))
                await asyncio.sleep(self.retry)
            finally:
                if watch is not None:
                    await cancel_watch(watch)

    def _apply_record(self, deleted: bool, key: str, value: bytes) -> bool:
        """A workload, mesh connection, mesh grant, migration, checkpoint, model, event, deployment or replica
        record; False for any other key."""
        if key.startswith(keys.EVENTS):
            if deleted:
                self.event_log.drop(key[len(keys.EVENTS):])
            else:
                self.event_log.put(EV.Event.FromString(value))
            return True
        if self.deployments.apply(deleted, key, value):
            return True
        if key.startswith(keys.MODELS):
            table, name, msg = self.models.models, key[len(keys.MODELS):], MR.Model
        elif key.startswith(keys.MIGRATIONS):
            table, name, msg = self.migrations.migrations, key[len(keys.MIGRATIONS):], MS.Migration
        elif key.startswith(keys.CHECKPOINTS):
            table, name, msg = self.migrations.checkpoints, key[len(keys.CHECKPOINTS):], MS.CheckpointInfo
        elif key.startswith(keys.WORKLOADS):
            table, name, msg = self.workloads.workloads, key[len(keys.WORKLOADS):], types_pb2.Workload
        elif key.startswith(keys.MESH):
            table, name, msg = self.mesh.connections, key[len(keys.MESH):], M.MeshConnection
        elif key.startswith(keys.MESH_GRANTS):
            table, name, msg = self.mesh.grants, None, M.MeshGrant
        else:
            return False
        if name is None:  # grants are held by (from, to) tenant
            g = msg.FromString(value) if not deleted else None
            pair = (g.from_tenant, g.to_tenant) if g else tuple(key[len(keys.MESH_GRANTS):].split("/", 1))
            if g is None:
                table.pop(pair, None)
            else:
                table[pair] = g
        elif deleted:
            table.pop(name, None)
        else:
            table[name] = msg.FromString(value)
        return True

    def _apply_health(self, deleted: bool, key: str, value: bytes) -> None:
        """A GPU's durable health (the leader's HealthController.restore does the same at its start): the standby's
        ListGpus/GetNode showed every GPU healthy, a quarantined one included."""
        from controlplane.controllers.health import HEALTH_NAME
        node, _, index = key[len(keys.GPU_HEALTH):].rpartition("/")
        g = self.ctl.fleet.gpu(node, int(index)) if index.isdigit() else None
        if g is None:
            return
        rec = types_pb2.GpuTelemetry() if deleted else types_pb2.GpuTelemetry.FromString(value)
        g.health = "healthy" if deleted else HEALTH_NAME.get(rec.health, "unhealthy")
        g.telemetry = (types_pb2.GpuTelemetry(index=g.index, health=rec.health, health_reason=rec.health_reason)
                       if g.health != "healthy" else None)

    def apply(self, deleted: bool, key: str, value: bytes, revision: int, lease: int = 0) -> None:
        """One watch event: a node record, an alive key (readiness), a slice, a workload or a mesh
        record; other keys are ignored."""
        ctl, fleet = self.ctl, self.ctl.fleet
        ctl.revision = max(ctl.revision, revision)
        self.applied += 1
        if self._apply_record(deleted, key, value):
            return
        if key.startswith(keys.SLICES):
            sid = key[len(keys.SLICES):]
            if deleted:
                s = fleet.drop_slice(sid)
                if s is not None:
                    ctl.events.publish(DELETED, s, revision)
            else:
                s = decode_slice(value)
                kind = MODIFIED if sid in fleet.slices else ADDED
                fleet.put_slice(s, revision)
                ctl.events.publish(kind, s, revision)
        elif key.startswith(keys.ALIVE):
            name = key[len(keys.ALIVE):]
            if deleted:
                self._alive.pop(name, None)
            else:
                self._alive[name] = lease
            entry = fleet.nodes.get(name)
            if entry is not None:
                entry.ready = not deleted
                entry.lease_id = 0 if deleted else lease
                if deleted and not entry.record.message:
                    entry.record.message = "lease expired"
        elif key.startswith(keys.NODES):
            name = key[len(keys.NODES):]
            if deleted:
                fleet.drop_node(name)
            else:
                entry = fleet.upsert_node(decode_node(value))
                entry.ready = name in self._alive
                entry.lease_id = self._alive.get(name, 0)
        elif key.startswith(keys.GPU_HEALTH):
            self._apply_health(deleted, key, value)
        elif key.startswith(keys.REQUESTS):
            tenant, _, rid = key[len(keys.REQUESTS):].partition("/")
            if deleted:
                ctl.requests.pop((tenant, rid), None)
            else:
                ctl.requests.load(tenant, rid, value)
