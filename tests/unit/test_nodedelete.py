"""DeleteNode (controlplane/controllers/nodedelete.py): a NotReady node is retired for good, everything on it
ended through the controllers' own paths; a READY, unknown or badly named node is refused; a control plane
that stops in the middle of a deletion finishes it when it starts again from what etcd holds.

The control plane here is the real one (slice controller, node manager, workload, mesh and migration managers)
over a fake etcd that honours the writes' preconditions and can fail the writes touching a key prefix (an etcd
member away: UNAVAILABLE, nothing applied). Agents are fakes on real sessions: the live node's answers the
migration commands.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace as NS

import pytest

from controlplane.api.events import DELETED, MODIFIED
from controlplane.api.meshsvc import MeshManager
from controlplane.api.services import AdminService
from controlplane.controllers import migration_steps, migrations
from controlplane.controllers.migration_phases import C, P, R
from controlplane.controllers.migrations import MigrationManager
from controlplane.controllers.nodedelete import NodeDeleter
from controlplane.controllers.nodes import NodeManager
from controlplane.controllers.slices import Controller
from controlplane.controllers.workloads import WorkloadManager
from controlplane.serving import reconcile as rc
from controlplane.serving.deployments import DeploymentManager
from controlplane.state import keys
from controlplane.state.store import Absent, Present, Put, Snapshot
from gpumesh.v1 import admin_service_pb2
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import mesh_service_pb2 as MS
from gpumesh.v1 import migration_service_pb2 as M
from gpumesh.v1 import node_service_pb2
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
    """A leader's start over what etcd holds (the order of controlplane/server.py _lead): over the fake `Etcd`,
    or a real EtcdStore (leading) with the real group-commit writer."""
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


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Shorter pauses between repeated agent steps (the product's are seconds)."""
    monkeypatch.setattr(migration_steps, "RESEND", 0.02)
    monkeypatch.setattr(migrations, "RESEND", 0.02)


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


async def test_a_notready_node_is_deleted_and_everything_on_it_ends():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        agent = connect_a(cp)
        migrate(cp, etcd)
        dm = DeploymentManager(cp.ctl, cp.wm, registry=NS())     # its loop not started: each pass by hand below
        dm.store.replicas["chat"] = {
            "r-1": D.Replica(id="r-1", deployment="chat", node=B, slice_id="s-b2", allocation_id="a-2",
                             workload_id="w-b", state=D.REPLICA_STATE_READY),
            "r-2": D.Replica(id="r-2", deployment="chat", node=A, slice_id="s-a2", allocation_id="a-3",
                             workload_id="w-a", state=D.REPLICA_STATE_READY)}
        dm.down_since[B] = 0.0
        watch = cp.ctl.events.subscribe("test")
        resp = await delete_rpc(cp, B)
        assert sorted(resp.slices) == ["s-b1", "s-b2", "s-bt"]
        assert sorted(resp.allocations) == ["a-2", "a-5", "a-gang"]
        assert sorted(resp.workloads) == ["w-b", "w-from-b"]
        assert sorted(resp.migrations) == ["m-from-b", "m-to-b"]
        assert list(resp.connections) == ["c-1"] and list(resp.replicas) == ["chat/r-1"]
        assert resp.node.name == B and resp.node.deleting and resp.node.state == T.NODE_STATE_NOT_READY
        check_deleted(etcd)
        assert B not in cp.ctl.fleet.nodes and B not in cp.ctl.deleted_nodes and not cp.ctl.fleet.slices_on(B)
        assert dm._kick.is_set() and B not in dm.down_since
        # the replica on B is lost at once (its slice is gone), not after deployment_node_lost_seconds
        plan = rc.reconcile(rc.Desired(replicas=2), [dm.observe(r) for r in dm.store.replicas_of("chat")], time.time(),
                            dm.policy)
        assert ("remove", "r-1") in plan.kinds() and any(a.kind == "create" and a.count == 1 for a in plan.actions)
        assert ("remove", "r-2") not in plan.kinds()
        assert ("ABORT_SOURCE", "m-to-b") in agent.got and ("STOP_TARGET", "m-from-b") in agent.got
        assert ("Node", B, "NodeDeleted") in [e[:3] for e in cp.ctl.recorder.events]
        seen = {}
        for ev in drain(watch):
            seen.setdefault(ev.slice.id, []).append((ev.type, ev.slice.message))
        assert seen["s-b2"] == [(MODIFIED, f"node {B} deleted"), (DELETED, f"node {B} deleted")]
        # a retry: the node is gone
        with pytest.raises(Refused) as e:
            await delete_rpc(cp, B)
        assert e.value.args[0] == errors.NotFound.code
        # its agent comes back: a new node, sent nothing of the old one; its reports change nothing
        reg = await cp.nodes.register(B, node(B).inventory, "agent/2")
        assert reg.state == T.NODE_STATE_READY and not reg.deleting and reg.slices == 0
        assert cp.wm.desired_on(B) == []
        session = cp.ctl.sessions.open(B)
        await cp.wm._report(B, node_service_pb2.WorkloadStatusReport(full=True, workloads=[
            T.Workload(id="w-b", node=B, state=T.WORKLOAD_STATE_STOPPED)]))
        w = cp.wm.workloads["w-b"]
        assert (w.state, w.message) == (T.WORKLOAD_STATE_FAILED, f"node {B} deleted")
        forget = [m for m in drain(session.outbox) if m.WhichOneof("kind") == "workloads"]
        assert forget and list(forget[-1].workloads.forget) == ["w-b"]          # its files go on the host
        await cp.ctl.report(B, True, [node_service_pb2.SliceStatus(slice_id="s-b2", state=T.SLICE_STATE_READY)], [])
        assert "s-b2" not in cp.ctl.fleet.slices                                   # no zombie slice
    finally:
        await cp.stop()


@pytest.mark.parametrize("name,code", [
    ("", errors.InvalidArgument), ("Node_B", errors.InvalidArgument), ("x" * 64, errors.InvalidArgument),
    ("node-z", errors.NotFound), (A, errors.FailedPrecondition)])
async def test_refused(name, code):
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        before = dict(etcd.kv)
        with pytest.raises(Refused) as e:
            await delete_rpc(cp, name)
        status, details = e.value.args
        assert status == code.code and etcd.kv == before
        if code is errors.InvalidArgument:
            assert details.startswith("name")
        if code is errors.FailedPrecondition:
            assert A in details and "drain it and stop its agent first" in details
    finally:
        await cp.stop()


async def test_an_agent_that_registered_just_before_the_marker_wins():
    """The marker is written only while the node holds no lease (a guard in the same transaction)."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        etcd.kv[keys.alive(B)] = B.encode()         # registered in etcd; this leader has not seen it yet
        with pytest.raises(errors.FailedPrecondition, match="registered again"):
            await cp.deleter.delete(B)
        assert not etcd.get(keys.node(B), T.Node).deleting and B not in cp.ctl.deleted_nodes
    finally:
        await cp.stop()


async def test_a_node_being_deleted_cannot_register():
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        connect_a(cp)
        migrate(cp, etcd)
        etcd.fail.add(keys.SLICES.encode())       # the deletion cannot finish for now
        cp.deleter.answer_wait = 0.2
        with pytest.raises(errors.Unavailable, match="goes on in the background"):
            await cp.deleter.delete(B)
        with pytest.raises(errors.FailedPrecondition, match="being deleted"):
            await cp.nodes.register(B, node(B).inventory, "agent/2")
        etcd.fail.clear()
        resp = await cp.deleter.delete(B)           # the retried call joins the deletion and answers
        assert sorted(resp.slices) == ["s-b1", "s-b2", "s-bt"]
        check_deleted(etcd)
    finally:
        await cp.stop()


async def test_a_register_that_was_granted_its_lease_while_the_marker_was_written_is_refused():
    """Register awaits etcd for a lease; a deletion that began meanwhile wins (its write would bring the node
    back READY, half-deleted)."""
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    try:
        granted = asyncio.Event()

        async def slow_grant(ttl):
            await granted.wait()
            return 7
        etcd.grant_lease = slow_grant
        registering = asyncio.create_task(cp.nodes.register(B, node(B).inventory, "agent/1"))
        await asyncio.sleep(0.05)
        await cp.deleter._mark(B, cp.ctl.fleet.nodes[B])
        granted.set()
        with pytest.raises(errors.FailedPrecondition, match="being deleted"):
            await registering
        assert keys.alive(B) not in etcd.kv and etcd.get(keys.node(B), T.Node).deleting
    finally:
        await cp.stop()


@pytest.mark.parametrize("fails", [keys.WORKLOADS, keys.MESH, keys.SLICES, keys.MIGRATIONS, keys.NODES])
async def test_a_control_plane_stopped_mid_deletion_finishes_it_at_start(fails):
    """The first leader stops (as in a crash) while a write of one step keeps failing; the next leader, loaded
    from etcd, finds the marker and finishes the deletion."""
    etcd = Etcd()
    fleet(etcd)
    first = await control_plane(etcd)
    connect_a(first)
    migrate(first, etcd)
    first.deleter.answer_wait = 0.3
    etcd.fail.add(fails.encode() if fails != keys.NODES else keys.node(B))
    if fails == keys.NODES:
        etcd.fail.add(keys.GPU_HEALTH.encode())     # the marker is written; the last transaction is not
        first.deleter._mark = _mark_unguarded(first.deleter, etcd)
    with pytest.raises(errors.Unavailable):
        await first.deleter.delete(B)
    await first.stop()                              # the crash: nothing of its memory survives
    assert etcd.get(keys.node(B), T.Node).deleting
    etcd.fail.clear()
    second = await control_plane(etcd)
    try:
        connect_a(second)
        assert B in second.ctl.deleted_nodes
        with pytest.raises(errors.FailedPrecondition):
            await second.nodes.register(B, node(B).inventory, "agent/2")
        await wait_for(lambda: keys.node(B) not in etcd.kv, "the deletion to finish")
        await wait_for(lambda: all(etcd.get(keys.migration(m), M.Migration).phase in migrations.FINISHED
                                   for m in ("m-from-b", "m-to-b")), "the migrations to end")
        check_deleted(etcd)
        assert B not in second.ctl.fleet.nodes and B not in second.ctl.deleted_nodes
        assert ("Node", B, "NodeDeleted") in [e[:3] for e in second.ctl.recorder.events]
    finally:
        await second.stop()


def _mark_unguarded(deleter, etcd):
    """The marker's own write goes through although node keys fail (to fail only the last transaction)."""
    real = deleter._mark

    async def mark(name, entry):
        etcd.fail.discard(keys.node(B))
        try:
            await real(name, entry)
        finally:
            etcd.fail.add(keys.node(B))
    return mark


async def test_a_migration_committed_to_the_deleted_node_finishes_with_the_workload_failed():
    etcd = Etcd()
    fleet(etcd)
    w = etcd.get(keys.workload("w-to-b"), T.Workload)
    w.node, w.slice_id = B, "s-bt"                  # the commit moved the record to the target, on B
    etcd.kv[keys.workload(w.id)] = w.SerializeToString()
    cp = await control_plane(etcd)
    try:
        ConnectedA = connect_a(cp)
        ConnectedA.ANSWERS = {**AgentA.ANSWERS, C.STOP_SOURCE: R.SOURCE_STOPPED}
        m = M.Migration(id="m-to-b", workload_id="w-to-b", tenant="t", source_node=A, source_slice="s-a3",
                        target_node=B, target_slice="s-bt", target_allocated=True, session="mig-m-to-b",
                        phase=P.MIGRATION_PHASE_COMMITTED)
        etcd.kv[keys.migration(m.id)] = m.SerializeToString()
        cp.mm.migrations[m.id] = m
        cp.mm._spawn(m.id)
        resp = await cp.deleter.delete(B)
        assert list(resp.migrations) == ["m-to-b"] and "w-to-b" in resp.workloads
        done = etcd.get(keys.migration("m-to-b"), M.Migration)
        assert done.phase == P.MIGRATION_PHASE_DONE and "ended before it ran" in done.message
        assert ("STOP_SOURCE", "m-to-b") in ConnectedA.got
    finally:
        await cp.stop()



async def test_the_health_recovery_of_the_deleted_node_s_gpus_ends_with_it():
    """A GPU of B marked unhealthy: the health controller moves its workload off (a task waiting for the move)
    before it asks the reset. B deleted, that task went on (next it tried B itself and recorded events on a
    node that no longer exists) and B's GPU records stayed; now they end with the node, A's go on."""
    from controlplane.controllers.telemetry import Policy, TelemetryManager
    etcd = Etcd()
    fleet(etcd)
    cp = await control_plane(etcd)
    tm = TelemetryManager(cp.ctl, Policy(), clock=time.time)
    never = asyncio.Event()
    moving: list[str] = []

    async def migrate(wid, to_node="", to_slice="", mode=0, reason="migrate"):
        moving.append(wid)
        await never.wait()                 # the move of the workload is under way

    cp.mm.migrate = migrate
    try:
        connect_a(cp)
        ga, gb = cp.ctl.fleet.gpu(A, 1), cp.ctl.fleet.gpu(B, 1)     # w-a on s-a2, w-b on s-b2
        wb = cp.wm.workloads["w-b"]
        was, wb.state = wb.state, T.WORKLOAD_STATE_RUNNING    # marked while B was still up (now B is NotReady)
        for g in (ga, gb):
            tm.health._migrate_off(g, tm.health.rec(g))
        wb.state = was
        await wait_for(lambda: sorted(moving) == ["w-a", "w-b", "w-to-b"], "the health migrations to start")
        tasks = {t.get_name(): t for t in tm.health.tasks}
        await delete_rpc(cp, B)
        await wait_for(lambda: tasks["health-migrate-w-b"].done(), "B's health migration to end")
        assert tasks["health-migrate-w-b"].cancelled()
        assert not tasks["health-migrate-w-a"].done() and not tasks["health-migrate-w-to-b"].done()
        assert [k for k in tm.health.gpus if k[0] == B] == [] and (A, 1) in tm.health.gpus
        assert set(tm.health.task_nodes.values()) == {A} and B not in tm.events
    finally:
        never.set()                 # (the moves' planning runs to its end even when its task is cancelled)
        for t in list(tm.health.tasks):
            t.cancel()
        await cp.stop()
