"""The mesh recovery tests' cluster (tests/unit/test_mesh_recovery.py, test_mesh_reopen.py): real registrars
(real shared memory segments, a real TCP data plane, the pyverbs stand-in), a simulated Sync session per agent,
an in-memory etcd with the writer's preconditions."""

from __future__ import annotations

import asyncio
import os
import types

import pytest

from controlplane.api.meshsvc import MeshManager
from controlplane.state import keys
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.transport import connect
from mesh.transport.base import BufferDescriptor
from nodeagent.registrar import Registrar

READY, FAILED, RECOVERING = (M.MESH_CONNECTION_STATE_READY, M.MESH_CONNECTION_STATE_FAILED,
                             M.MESH_CONNECTION_STATE_RECOVERING)
SLICES = {"s-a": "n1", "s-b": "n2"}


class Etcd:
    """The writer's contract: all ops or none, guarded by Present/Absent (Aborted when a guard fails)."""

    def __init__(self) -> None:
        self.kv: dict[bytes, bytes] = {}

    async def write(self, ops, conds=()):
        await asyncio.sleep(0)
        for c in conds:
            if isinstance(c, Present) and c.key not in self.kv or isinstance(c, Absent) and c.key in self.kv:
                raise errors.Aborted(f"precondition failed on {c.key!r}")
        for op in ops:
            if isinstance(op, Put):
                self.kv[op.key] = op.value
            elif isinstance(op, Delete):
                self.kv.pop(op.key, None)

    def connection(self, cid: str) -> M.MeshConnection:
        c = M.MeshConnection()
        c.ParseFromString(self.kv[keys.mesh(cid)])
        return c


class Session:
    """One agent's Sync stream: messages to the agent in order, its answers back to the control plane."""

    def __init__(self, mgr: MeshManager, registrar: Registrar) -> None:
        self.mgr, self.r = mgr, registrar
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()     # what the agent sends unasked (after its MeshHello)
        self.seen: list[str] = []
        self.task = asyncio.create_task(self._serve())
        self.forwarder: asyncio.Task | None = None

    def forward(self) -> None:
        """Deliver what the agent puts on its stream by itself (MeshBufferFailed) to the control plane."""
        async def run():
            while True:
                msg = await self.outbox.get()
                if msg.WhichOneof("kind") == "mesh_buffer_failed":
                    await self.mgr.on_buffer_failed(self.r.node, msg.mesh_buffer_failed)
        self.forwarder = asyncio.create_task(run())

    def send(self, msg) -> None:
        self.inbox.put_nowait(msg)

    async def _serve(self) -> None:
        while True:
            msg = await self.inbox.get()
            kind = msg.WhichOneof("kind")
            self.seen.append(kind)
            out: asyncio.Queue = asyncio.Queue()
            await self.r.agent.handlers[kind](getattr(msg, kind), out)
            while not out.empty():
                reply = out.get_nowait()
                if reply.WhichOneof("kind") == "mesh_registered":
                    await self.mgr.on_registered(self.r.node, reply.mesh_registered)

    def close(self) -> None:
        self.task.cancel()
        if self.forwarder is not None:
            self.forwarder.cancel()


class Cluster:
    def __init__(self, tmp_path, transport: str = "tcp", verbs=None) -> None:
        ready = types_pb2.SLICE_STATE_READY
        self.slices = {sid: types_pb2.Slice(id=sid, tenant="team-a", node=n, state=ready) for sid, n in SLICES.items()}
        self.etcd = Etcd()
        self.sessions: dict[str, Session] = {}
        self.ctl = types.SimpleNamespace(agent_handlers={}, writer=self.etcd, sessions=self.sessions,
                                         fleet=types.SimpleNamespace(slices=self.slices, nodes={}))
        self.mgr = MeshManager(self.ctl)
        self.tmp, self.transport, self.verbs = tmp_path, transport, verbs
        self.agents: dict[str, Registrar] = {}
        self.isolator = None

    def start_agent(self, node: str) -> Registrar:
        from mesh.transport.verbs import VerbsTransport
        agent = types.SimpleNamespace(node=node, endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                      desired_hooks=[], desired={s: self.slices[s] for s, n in SLICES.items()
                                                                 if n == node and s in self.slices})
        if self.isolator is not None:
            agent.isolator = self.isolator
        vt = VerbsTransport(node, pyverbs=self.verbs) if self.verbs is not None else None
        r = Registrar(agent, "127.0.0.1:0", verbs_transport=vt, state_dir=str(self.tmp / "mesh" / node))
        self.agents[node] = r
        return r

    async def open_session(self, node: str) -> None:
        """The agent's new Sync stream: its MeshHello reaches the control plane."""
        r = self.agents[node]
        self.sessions[node] = session = Session(self.mgr, r)
        r.on_session(session.outbox)
        await self.mgr.on_hello(node, session.outbox.get_nowait().mesh_hello)
        session.forward()

    def kill_agent(self, node: str) -> None:
        """SIGKILL: no deregistration; the data plane, QPs and MRs die with the process, the segments stay."""
        r = self.agents.pop(node)
        s = self.sessions.pop(node, None)
        if s is not None:
            s.close()
        r.server.close()
        if r.verbs is not None:
            for b in list(r.verbs.buffers.values()):
                for obj in (b.qp, b.cq, b.staging, b.mr):
                    obj.close()
        for held in r.buffers.values():
            if held.region is not None:
                held.region.detach()
        r.buffers.clear()

    async def connect(self, size: int = 1 << 16) -> M.MeshConnection:
        hello = M.MeshHello(transports=["tcp", "shm"] + (["verbs"] if self.verbs is not None else []))
        self.mgr.hellos.setdefault("n1", hello)
        self.mgr.hellos.setdefault("n2", hello)
        for n in ("n1", "n2"):
            self.ctl.fleet.nodes[n] = types.SimpleNamespace(record=types_pb2.Node(name=n))
        from controlplane.api import auth
        token = auth._current.set(auth.Principal("client", "x", "team-a", "tenant"))
        try:
            return await self.mgr.connect(M.MeshConnectRequest(slice_a="s-a", slice_b="s-b", size_bytes=size,
                                                               transport=self.transport))
        finally:
            auth._current.reset(token)

    async def settle(self, cid: str) -> M.MeshConnection:
        """Wait for the recovery of `cid` to finish (no timing bound: it ends or the test's timeout does)."""
        while True:
            task = self.mgr.recovery.tasks.get(cid)
            if task is None:
                return self.mgr.connections.get(cid)
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        for r in self.agents.values():
            r.close()


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(**kw) -> Cluster:
        made.append(Cluster(tmp_path, **kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


async def until(cond, what: str, timeout: float = 30.0) -> None:
    """Wait for `cond()` on the cluster's loop: what an agent does with a message takes a few turns of the
    loop, and a fixed sleep can end first on a stalled machine; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _open(conn: M.MeshConnection, side: str):
    mine = conn.b if side == "a" else conn.a
    target = conn.a if side == "a" else conn.b
    return connect(BufferDescriptor.from_proto(target), secret=conn.secret, local=BufferDescriptor.from_proto(mine))


class SliceShm:
    """The isolation's slice directories (nodeagent/isolation/plan.py share_segment): a hard link of each
    segment in the slice's private /dev/shm."""

    def __init__(self, root: str) -> None:
        self.shm_root = root

    def share_segment(self, slice_id, tenant, name):
        d = os.path.join(self.shm_root, slice_id)
        os.makedirs(d, exist_ok=True)
        if not os.path.exists(os.path.join(d, name)):
            os.link(os.path.join("/dev/shm", name), os.path.join(d, name))

    def unshare_segment(self, slice_id, name):
        try:
            os.unlink(os.path.join(self.shm_root, slice_id, name))
        except OSError:
            pass
