"""The world of the DeleteNode tests (test_nodedelete.py and its neighbours): a fake etcd that honours the writes'
preconditions and can fail the writes touching a key prefix, the real control plane over it, the fleet of node A
(stays) and node B (its agent gone, deleted), fake agents on real sessions, and the checks of what a deletion
leaves."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace as NS

import pytest

from controlplane.api.meshsvc import MeshManager
from controlplane.api.services import AdminService
from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import C, P, R
from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.nodedelete import NodeDeleter
from controlplane.controllers.nodes import NodeManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.state import keys
from controlplane.state.store import Absent, Present, Put, Snapshot
from gpumesh.v1 import admin_service_pb2
from gpumesh.v1 import mesh_service_pb2 as MS
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import types_pb2 as T
from mesh import errors

A, B = "node-a", "node-b"           # A stays; B's agent is gone and B is deleted


class Etcd:
    """The store and the writer in one: a dict of keys; `fail` holds key prefixes whose writes fail."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}
        self.rev = 1
        self.fail: set[bytes] = set()

    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        if any(o.key.startswith(p) for o in ops for p in self.fail):
            raise errors.Unavailable("etcd: no leader (a member is restarting)")
        for c in conds:
            if isinstance(c, Absent) and c.key in self.kv or isinstance(c, Present) and c.key not in self.kv:
                raise errors.Aborted(f"precondition failed on {c.key!r}")
        for o in ops:
            if isinstance(o, Put):
                self.kv[o.key] = o.value
            else:
                self.kv.pop(o.key, None)
        self.rev += 1
        return self.rev

    async def load(self, prefix: str = keys.PREFIX) -> Snapshot:
        return Snapshot(self.rev, {k: (v, self.rev, 7 if k.startswith(keys.ALIVE.encode()) else 0)
                                   for k, v in self.kv.items() if k.startswith(prefix.encode())})

    async def watch_prefix(self, prefix: str, start: int):
        return _Quiet()

    async def grant_lease(self, ttl: int) -> int:
        return 7

    async def refresh_lease(self, lease: int) -> int:
        return 10

    def get(self, key: bytes, msg):
        v = self.kv.get(key)
        return None if v is None else msg.FromString(v)

    def under(self, prefix: str) -> list[bytes]:
        return sorted(k for k in self.kv if k.startswith(prefix.encode()))


class _Quiet:
    """A watch on which nothing happens."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()

    async def cancel(self):
        pass


class Refused(Exception):
    """What the servicer's context was aborted with: (grpc status code, details)."""


class Context:
    async def abort_with_status(self, status):
        raise Refused(status.code, status.details)

    async def abort(self, code, details):
        raise Refused(code, details)


async def delete_rpc(cp, name: str) -> admin_service_pb2.DeleteNodeResponse:
    return await cp.admin.DeleteNode(admin_service_pb2.DeleteNodeRequest(name=name), Context())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def emit(self, kind, name, type_, reason, message, **kw):
        self.events.append((kind, name, reason, message))


async def control_plane(etcd):
    """A leader's start over what etcd holds (the order of controlplane/leader.py LeaderControllers.start): over the
    fake `Etcd`, or a real EtcdStore (leading) with the real group-commit writer."""
    ctl = Controller(etcd)
    if isinstance(etcd, Etcd):
        ctl.writer.write = etcd.write
    else:
        ctl.writer.start()
    ctl.recorder = Recorder()
    nodes = NodeManager(ctl)
    await nodes.load()
    wm = WorkloadManager(ctl)
    await wm.load()
    mesh = MeshManager(ctl)
    await mesh.load()
    mm = MigrationManager(ctl, wm)
    await mm.load()
    deleter = NodeDeleter(ctl, nodes, wm, mesh)
    deleter.migration_wait, deleter.retry = 10.0, 0.02
    await deleter.resume()
    cp = NS(ctl=ctl, nodes=nodes, wm=wm, mesh=mesh, mm=mm, deleter=deleter, admin=AdminService(ctl, nodes, deleter))

    async def stop():
        await deleter.stop()
        await mm.stop()
        await mesh.stop()
        await wm.stop()
        await nodes.stop()
        if not isinstance(etcd, Etcd):
            await ctl.writer.stop()
    cp.stop = stop
    return cp


def node(name: str) -> T.Node:
    return T.Node(name=name, state=T.NODE_STATE_READY, inventory=T.NodeInventory(
        gpus=[T.Gpu(index=0, uuid=f"GPU-{name}-0", model="A100-80GB"), T.Gpu(index=1, uuid=f"GPU-{name}-1",
                                                                            model="A100-80GB")]))


def slice_(sid: str, on: str, alloc: str, gpu: int = 0, tenant: str = "t", **labels) -> T.Slice:
    return T.Slice(id=sid, allocation_id=alloc, tenant=tenant, node=on, gpu_uuid=f"GPU-{on}-{gpu}", gpu_index=gpu,
                   gpu_model="A100-80GB", isolation=T.ISOLATION_MPS, memory_bytes=1 << 30, compute_share=0.1,
                   state=T.SLICE_STATE_READY, labels=labels)


def workload(wid: str, s: T.Slice) -> T.Workload:
    return T.Workload(id=wid, slice_id=s.id, node=s.node, tenant=s.tenant, command=["train"],
                      state=T.WORKLOAD_STATE_RUNNING, pid=42)


def fleet(etcd: Etcd, b_ready: bool = False) -> None:
    """Nodes A (ready) and B (NotReady unless `b_ready`); on B: a gang allocation with a slice on A too, a slice
    with a workload, a mesh connection to A, the target slices of a migration from B to A and of one from A to B
    (started by `migrate`), GPU health records."""
    for n in (A, B):
        etcd.kv[keys.node(n)] = node(n).SerializeToString()
    etcd.kv[keys.alive(A)] = A.encode()
    if b_ready:
        etcd.kv[keys.alive(B)] = B.encode()
    slices = [slice_("s-b1", B, "a-gang"), slice_("s-a1", A, "a-gang"), slice_("s-b2", B, "a-2", gpu=1),
              slice_("s-a2", A, "a-3", gpu=1), slice_("s-a3", A, "a-4", gpu=1),
              slice_("s-bt", B, "a-5", **{"gpumesh-migration": "m-to-b"}), slice_("s-at", A, "a-6",
                                                                                  **{"gpumesh-migration": "m-from-b"})]
    for s in slices:
        etcd.kv[keys.slice_(s.id)] = s.SerializeToString()
    by = {s.id: s for s in slices}
    for w in (workload("w-b", by["s-b2"]), workload("w-a", by["s-a2"]), workload("w-from-b", by["s-b1"]),
              workload("w-to-b", by["s-a3"])):
        etcd.kv[keys.workload(w.id)] = w.SerializeToString()
    c = MS.MeshConnection(id="c-1", tenant="t", slice_a="s-b2", slice_b="s-a2", state=MS.MESH_CONNECTION_STATE_READY,
                          a=MS.BufferDescriptor(node=B, buffer_id="bb"), b=MS.BufferDescriptor(node=A, buffer_id="ba"))
    etcd.kv[keys.mesh(c.id)] = c.SerializeToString()
    for i in (0, 1):
        etcd.kv[keys.gpu_health(B, i)] = T.GpuTelemetry(index=i, health=T.GPU_HEALTH_QUARANTINED).SerializeToString()
    etcd.kv[keys.gpu_health(A, 0)] = T.GpuTelemetry(index=0, health=T.GPU_HEALTH_UNHEALTHY).SerializeToString()


def migrate(cp, etcd: Etcd) -> None:
    """Two migrations copying (the leader drives them): from B to A, and from A to B."""
    for m in (M.Migration(id="m-from-b", workload_id="w-from-b", tenant="t", source_node=B, source_slice="s-b1",
                          target_node=A, target_slice="s-at", target_allocated=True, session="mig-m-from-b",
                          phase=P.MIGRATION_PHASE_COPYING),
              M.Migration(id="m-to-b", workload_id="w-to-b", tenant="t", source_node=A, source_slice="s-a3",
                          target_node=B, target_slice="s-bt", target_allocated=True, session="mig-m-to-b",
                          phase=P.MIGRATION_PHASE_COPYING)):
        etcd.kv[keys.migration(m.id)] = m.SerializeToString()
        etcd.kv[keys.migration_secret(m.id)] = b"x" * 32
        cp.mm.migrations[m.id] = m
        cp.mm.secrets[m.id] = b"x" * 32
        cp.mm._spawn(m.id)


def drain(q) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


class AgentA:
    """Node A's agent on its session: answers every migration command (the source resumes, the target stops)."""

    ANSWERS = {C.STOP_TARGET: R.TARGET_STOPPED, C.ABORT_SOURCE: R.SOURCE_RESUMED}     # SEND: copying on

    def __init__(self, mm, mesh) -> None:
        self.mm, self.mesh, self.got = mm, mesh, []

    def send(self, msg) -> None:
        if msg.WhichOneof("kind") == "mesh_deregister":        # revoked at once
            ok = MS.MeshRegistered(request_id=msg.mesh_deregister.request_id)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.mesh.on_registered(A, ok)))
        if msg.WhichOneof("kind") != "migration":
            return
        cmd = msg.migration
        self.got.append((C.Action.Name(cmd.action), cmd.migration_id))
        if cmd.action not in self.ANSWERS:
            return
        rep = M.MigrationReport(migration_id=cmd.migration_id, event=self.ANSWERS[cmd.action])
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.mm._on_report(A, rep)))


def connect_a(cp) -> AgentA:
    agent = AgentA(cp.mm, cp.mesh)
    cp.ctl.sessions.open(A).send = agent.send
    return agent


async def wait_for(cond, what: str, timeout: float = 20.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := cond()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def check_deleted(etcd: Etcd) -> None:
    """Everything of B is gone or ended in etcd; A's own things are as they were (but the gang's slice)."""
    assert keys.node(B) not in etcd.kv and keys.node(A) in etcd.kv
    assert etcd.under(keys.GPU_HEALTH) == [keys.gpu_health(A, 0)]
    assert not [k for k in etcd.under(keys.SLICES) if etcd.get(k, T.Slice).node == B]
    for wid in ("w-b", "w-from-b"):
        w = etcd.get(keys.workload(wid), T.Workload)
        assert (w.state, w.message) == (T.WORKLOAD_STATE_FAILED, f"node {B} deleted")
    assert etcd.get(keys.workload("w-a"), T.Workload).state == T.WORKLOAD_STATE_RUNNING
    assert etcd.get(keys.workload("w-to-b"), T.Workload).state == T.WORKLOAD_STATE_RUNNING    # its source resumed
    gang = etcd.get(keys.slice_("s-a1"), T.Slice)           # the gang's other slice: released, its agent tears it down
    assert (gang.state, gang.message) == (T.SLICE_STATE_RELEASING, f"node {B} deleted")
    assert etcd.get(keys.slice_("s-a2"), T.Slice).state == T.SLICE_STATE_READY
    assert keys.mesh("c-1") not in etcd.kv
    for mid in ("m-from-b", "m-to-b"):
        assert etcd.get(keys.migration(mid), M.Migration).phase == P.MIGRATION_PHASE_ABORTED, mid
        assert keys.migration_secret(mid) not in etcd.kv


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeated agent steps (the product's are seconds); autouse where it is imported."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)
