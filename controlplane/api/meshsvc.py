"""The mesh service: brokers registered buffers between two slices of a tenant.

Connect checks the slices (READY, one tenant unless a grant allows it),
chooses the transport from the topology (same node: shared memory; both nodes
with InfiniBand NICs and verbs: RDMA verbs; else the agents' TCP data plane),
asks both agents to register a buffer (`MeshRegister` on their Sync streams),
waits for both descriptors; for verbs it introduces the queue pairs to each
other (`MeshPeer`) and waits until both are in RTS; then it stores the
connection under `/gpumesh/v1/mesh/<id>` with how its bytes move (`data_path`)
and, when that is not RDMA, why (`fallback_reason`). Each connection gets a
secret (32 random bytes) that both agents receive with `MeshRegister` and that
opens the buffers on the data plane; it is returned to the caller of Connect and,
on Get/List, only to the two slices' tenants (tenant role), never to viewers. Disconnect, and the release of either slice, revoke both
buffers (`MeshDeregister`) and delete the connection. When an agent
reconnects, its `MeshHello` lists the buffers it still holds and those of a
previous run whose memory survived: connections that lost one are recovered
with the same id and secret (controlplane/api/meshrecovery.py; FAILED only when
the memory is gone), buffers no connection knows are revoked.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from controlplane.api import auth

from controlplane.state import keys
from controlplane.controllers.slices import Controller, now
from controlplane.api.rpc import unary
from controlplane.state.store import Absent, Delete, Present, Put
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import mesh_service_pb2_grpc, node_service_pb2, types_pb2
from mesh import errors
from mesh.logs import log
from controlplane.api.meshchoice import choose_transport, data_path, fallback_reason, same_host
from controlplane.api.meshrecovery import MeshRecovery
from mesh.transport.base import MAX_BUFFER_BYTES
from mesh.transport.channel import SECRET_BYTES

logger = logging.getLogger(__name__)
REGISTER_TIMEOUT_S = 15.0
REVOKE_TIMEOUT_S = 5.0
READY, CLOSED = M.MESH_CONNECTION_STATE_READY, M.MESH_CONNECTION_STATE_CLOSED
AGENT_ERRORS = {"not_found": errors.NotFound, "invalid_argument": errors.InvalidArgument,
                "unavailable": errors.Unavailable, "gone": errors.FailedPrecondition}


class MeshManager:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.connections: dict[str, M.MeshConnection] = {}
        self.grants: dict[tuple[str, str], M.MeshGrant] = {}
        self.hellos: dict[str, M.MeshHello] = {}
        self.pending: dict[str, asyncio.Future] = {}
        self.closing: set[str] = set()          # connections being disconnected: a recovery never writes them
        self.recovery = MeshRecovery(self)
        self._task: asyncio.Task | None = None
        ctl.agent_handlers["mesh_hello"] = self.on_hello
        ctl.agent_handlers["mesh_registered"] = self.on_registered
        ctl.agent_handlers["mesh_buffer_failed"] = self.on_buffer_failed

    async def load(self) -> None:
        for key, (value, _, _) in (await self.ctl.store.load(keys.MESH)).kvs.items():
            c = M.MeshConnection()
            c.ParseFromString(value)
            self.connections[c.id] = c
        for key, (value, _, _) in (await self.ctl.store.load(keys.MESH_GRANTS)).kvs.items():
            g = M.MeshGrant()
            g.ParseFromString(value)
            self.grants[(g.from_tenant, g.to_tenant)] = g
        self._task = asyncio.create_task(self._follow_releases(), name="mesh-releases")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.recovery.stop()

    # -- agents ---------------------------------------------------------------------------

    def _send(self, node: str, **kind) -> bool:
        session = self.ctl.sessions.get(node)
        if session is None:
            return False
        session.send(node_service_pb2.ControllerMessage(**kind))
        return True

    async def on_registered(self, node: str, msg: M.MeshRegistered) -> None:
        fut = self.pending.pop(msg.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def on_buffer_failed(self, node: str, msg: M.MeshBufferFailed) -> None:
        """`node`'s agent found a buffer of a connection unusable (damaged or removed segment): the connection
        turns FAILED with why, so `meshctl mesh get` and peers (MeshConnectionFailed) see it. Only a buffer that
        the connection places on that node counts."""
        c = self.connections.get(msg.connection_id)
        if c is None or not any(d.node == node and d.buffer_id == msg.buffer_id for d in (c.a, c.b)):
            log(logger, logging.INFO, "an agent reported an unusable buffer no connection places on its node",
                node=node, buffer=msg.buffer_id, connection=msg.connection_id)
            return
        why = msg.message or f"reason {msg.reason or 'unknown'}"
        if "disconnect and connect again" not in why:
            why += "; disconnect and connect again"
        await self.recovery.fail(c.id, msg.buffer_id, f"buffer {msg.buffer_id} of slice {msg.slice_id} on node "
                                                      f"{node} is unusable ({msg.reason or 'unknown'}): {why}")

    async def on_hello(self, node: str, msg: M.MeshHello) -> None:
        """A new Sync stream of `node`'s agent: recover the connections whose buffer it no longer holds (it
        restarted) or that were left RECOVERING; revoke the buffers (held or surviving) no connection knows."""
        self.hellos[node] = msg
        held, known = set(msg.buffers), set()
        for c in list(self.connections.values()):
            if node not in (c.a.node, c.b.node):
                continue
            known.update(d.buffer_id for d in (c.a, c.b) if d.node == node)
            if self.recovery.needs(c, node, held):
                self.recovery.schedule(c.id, f"the agent of node {node} restarted" if c.state == READY
                                       else f"the agent of node {node} reconnected")
        orphans = sorted((held | set(msg.recoverable)) - known)
        if orphans:
            self._send(node, mesh_deregister=M.MeshDeregister(buffer_ids=orphans, reason="orphan"))

    async def _ask(self, node: str, what: str, **kind) -> M.MeshRegistered:
        """Send one request to an agent and wait for its MeshRegistered answer."""
        rid = secrets.token_hex(8)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        for msg in kind.values():
            msg.request_id = rid
        if not self._send(node, **kind):
            self.pending.pop(rid, None)
            raise errors.Unavailable(f"the agent of node {node} ({what}) is not connected")
        try:
            reply = await asyncio.wait_for(fut, REGISTER_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise errors.Unavailable(f"the agent of node {node} did not answer ({what}) within "
                                     f"{REGISTER_TIMEOUT_S:g}s") from None
        finally:
            self.pending.pop(rid, None)
        if reply.error:
            cls = AGENT_ERRORS.get(reply.error_kind, errors.Unavailable)
            raise cls(f"node {node} could not {what}: {reply.error}")
        return reply

    async def _register(self, s: types_pb2.Slice, conn_id: str, size: int, transport: str,
                        secret: bytes) -> M.MeshRegistered:
        return await self._ask(s.node, f"register a buffer for slice {s.id}", mesh_register=M.MeshRegister(
            connection_id=conn_id, slice_id=s.id, size_bytes=size, transport=transport, secret=secret))

    # -- connect / disconnect ---------------------------------------------------------------

    def _slice(self, sid: str, field: str) -> types_pb2.Slice:
        if not sid:
            raise errors.InvalidArgument.of(field, "is required", "a slice ID (s-...)")
        s = self.ctl.fleet.slices.get(sid)
        if s is None:
            raise errors.NotFound(f"no slice {sid!r}", kind="slice", name=sid)
        if s.state != types_pb2.SLICE_STATE_READY:
            raise errors.FailedPrecondition(f"slice {sid} is {types_pb2.SliceState.Name(s.state)}, not READY")
        return s

    def allowed(self, from_tenant: str, to_tenant: str) -> bool:
        return from_tenant == to_tenant or (from_tenant, to_tenant) in self.grants

    async def connect(self, req: M.MeshConnectRequest) -> M.MeshConnection:
        if req.slice_a and req.slice_a == req.slice_b:
            raise errors.InvalidArgument.of("slice_b", "is slice_a", "another slice")
        self._check_access(req)
        a, b = self._slice(req.slice_a, "slice_a"), self._slice(req.slice_b, "slice_b")
        if not 0 < req.size_bytes <= MAX_BUFFER_BYTES:
            raise errors.InvalidArgument.of("size_bytes", f"{req.size_bytes} is out of range",
                                            f"1 to {MAX_BUFFER_BYTES} (4 GiB)")
        if not self.allowed(a.tenant, b.tenant):
            raise errors.PermissionDenied(f"slice {a.id} (tenant {a.tenant}) may not connect to slice {b.id} "
                                          f"(tenant {b.tenant}): slices of different tenants need an admin grant "
                                          f"from {a.tenant} to {b.tenant}")
        na, nb = self.ctl.fleet.nodes.get(a.node), self.ctl.fleet.nodes.get(b.node)
        if na is None or nb is None:
            raise errors.Unavailable(f"node {a.node if na is None else b.node} is not known")
        ta = self.hellos.get(a.node, M.MeshHello()).transports
        tb = self.hellos.get(b.node, M.MeshHello()).transports
        transport, why = choose_transport(na.record, nb.record, ta, tb, req.transport)
        cid = f"m-{secrets.token_hex(6)}"
        secret = secrets.token_bytes(SECRET_BYTES)
        results = await asyncio.gather(self._register(a, cid, req.size_bytes, transport, secret),
                                       self._register(b, cid, req.size_bytes, transport, secret),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if transport == "verbs" and not failed:
            # introduce the queue pairs to each other; both must reach RTS before the connection is READY
            da, db = results[0].descriptor, results[1].descriptor
            peered = await asyncio.gather(
                self._ask(a.node, f"connect the queue pair of {da.buffer_id}",
                          mesh_peer=M.MeshPeer(buffer_id=da.buffer_id, peer=db)),
                self._ask(b.node, f"connect the queue pair of {db.buffer_id}",
                          mesh_peer=M.MeshPeer(buffer_id=db.buffer_id, peer=da)), return_exceptions=True)
            failed = [p for p in peered if isinstance(p, BaseException)]
        got = [(s, r) for s, r in zip((a, b), results) if not isinstance(r, BaseException)]
        gone = [s.id for s in (a, b) if self.ctl.fleet.slices.get(s.id) is None
                or self.ctl.fleet.slices[s.id].state != types_pb2.SLICE_STATE_READY]
        if failed or gone:
            for s, r in got:
                self._send(s.node, mesh_deregister=M.MeshDeregister(buffer_ids=[r.descriptor.buffer_id],
                                                                    reason="connect failed"))
            if failed:
                raise failed[0]
            raise errors.FailedPrecondition(f"slice {gone[0]} was released while connecting")
        ha, hb = self.hellos.get(a.node, M.MeshHello()), self.hellos.get(b.node, M.MeshHello())
        one_host = a.node == b.node or same_host(results[0].descriptor, results[1].descriptor)
        path = data_path(transport, one_host, ha.tls and hb.tls)
        fallback = fallback_reason(transport, why, na.record, nb.record, ha, hb)
        conn = M.MeshConnection(id=cid, transport=transport, slice_a=a.id, slice_b=b.id, state=READY,
                                tenant=a.tenant, size_bytes=req.size_bytes, created_at=now(), reason=why,
                                secret=secret, data_path=path, fallback_reason=fallback)
        conn.a.CopyFrom(results[0].descriptor)
        conn.b.CopyFrom(results[1].descriptor)
        self.connections[cid] = conn        # before the write: a release while it is written finds it
        try:
            await self.ctl.writer.write([Put(keys.mesh(cid), conn.SerializeToString())], [Absent(keys.mesh(cid))])
        except BaseException:
            # not durable: no connection, and the buffers registered for it are given back
            self.connections.pop(cid, None)
            for d in (conn.a, conn.b):
                self._send(d.node, mesh_deregister=M.MeshDeregister(buffer_ids=[d.buffer_id],
                                                                    reason="connect not saved"))
            raise
        log(logger, logging.INFO, "mesh connected", connection=cid, transport=transport, reason=why,
            data_path=path, fallback_reason=fallback, slice_a=f"{a.id}@{a.node}", slice_b=f"{b.id}@{b.node}",
            size=req.size_bytes)
        return conn

    def _check_access(self, req: M.MeshConnectRequest) -> None:
        """The caller connects its own slice A to its own slice B, or to one a grant lets A's tenant
        reach; another tenant's slice otherwise reads as unknown (NOT_FOUND), so its existence does not leak."""
        a, b = self.ctl.fleet.slices.get(req.slice_a), self.ctl.fleet.slices.get(req.slice_b)
        if a is not None and not auth.visible(a.tenant):
            raise errors.NotFound(f"no slice {req.slice_a!r}", kind="slice", name=req.slice_a)
        if b is not None and not auth.visible(b.tenant) and not (a is not None and self.allowed(a.tenant, b.tenant)):
            raise errors.NotFound(f"no slice {req.slice_b!r}", kind="slice", name=req.slice_b)

    def may_hold_secret(self, c: M.MeshConnection) -> bool:
        """The secret goes only to the owners of the connection's slices: a client of slice A's or slice
        B's tenant with the tenant role or above (and the unrestricted caller of an open demo cluster)."""
        p = auth.current()
        if p.unrestricted:
            return True
        if p.kind != "client" or p.role not in ("tenant", "admin") or not p.tenant:
            return False
        b = self.ctl.fleet.slices.get(c.slice_b)
        return p.tenant == c.tenant or (b is not None and p.tenant == b.tenant)

    def shown(self, c: M.MeshConnection) -> M.MeshConnection:
        """`c` as the caller may see it: without the secret unless it owns one of the slices."""
        if not c.secret or self.may_hold_secret(c):
            return c
        return self._with(c, secret=b"")

    def get(self, cid: str) -> M.MeshConnection:
        c = self.connections.get(cid)
        if c is None or not self.visible(c):
            raise errors.NotFound(f"no mesh connection {cid!r}", kind="mesh connection", name=cid)
        return c

    def visible(self, c: M.MeshConnection) -> bool:
        """The caller's tenant owns slice A (the connection's tenant) or slice B (a granted peer)."""
        if auth.visible(c.tenant):
            return True
        b = self.ctl.fleet.slices.get(c.slice_b)
        return b is not None and auth.visible(b.tenant)

    async def _revoke(self, node: str, buffer_ids: list[str], reason: str) -> None:
        """Tell the agent to revoke the buffers and wait (briefly) until it has: the keys are dead on return.
        An agent that is not connected lost them anyway (its MeshHello will say so)."""
        rid = secrets.token_hex(8)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            if self._send(node, mesh_deregister=M.MeshDeregister(buffer_ids=buffer_ids, reason=reason,
                                                                 request_id=rid)):
                await asyncio.wait_for(fut, REVOKE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log(logger, logging.WARNING, "agent did not confirm a revocation", node=node, buffers=buffer_ids)
        finally:
            self.pending.pop(rid, None)

    async def disconnect(self, cid: str, reason: str = "disconnect") -> M.MeshConnection:
        c = self.get(cid)
        self.closing.add(cid)          # a recovery in flight stops here and writes nothing back
        try:
            await asyncio.gather(*(self._revoke(d.node, [d.buffer_id], reason) for d in (c.a, c.b)))
            if self.connections.pop(cid, None) is None:
                return self._with(c, state=CLOSED, message=reason)     # a concurrent disconnect finished first
            try:
                await self.ctl.writer.write([Delete(keys.mesh(cid))], [Present(keys.mesh(cid))])
            except errors.Aborted:
                pass   # already gone
            except BaseException:
                self.connections.setdefault(cid, c)     # still in etcd: a retry revokes again and deletes it
                raise
        finally:
            self.closing.discard(cid)
        log(logger, logging.INFO, "mesh disconnected", connection=cid, reason=reason)
        return self._with(c, state=CLOSED, message=reason)

    # -- releases ---------------------------------------------------------------------------

    async def _follow_releases(self) -> None:
        while True:
            q = self.ctl.events.subscribe()
            try:
                await self._sweep()
                while True:
                    ev = await q.get()
                    if ev is None:
                        break          # fell behind: resubscribe and sweep
                    s = ev.slice
                    if ev.type == ev.DELETED or s.state == types_pb2.SLICE_STATE_RELEASING:
                        await self._close_slice(s.id)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # keep following; a failed write is retried by the next sweep
                log(logger, logging.WARNING, "mesh release follower", error=repr(e))
                await asyncio.sleep(1.0)
            finally:
                self.ctl.events.unsubscribe(q)

    async def _sweep(self) -> None:
        for c in list(self.connections.values()):
            for sid in (c.slice_a, c.slice_b):
                s = self.ctl.fleet.slices.get(sid)
                if s is None or s.state == types_pb2.SLICE_STATE_RELEASING:
                    await self._close_slice(sid)

    async def _close_slice(self, sid: str) -> None:
        for c in [c for c in self.connections.values() if sid in (c.slice_a, c.slice_b)]:
            await self.disconnect(c.id, reason=f"slice {sid} released")

    # -- grants -----------------------------------------------------------------------------

    async def grant(self, req: M.MeshGrantRequest) -> M.MeshGrant:
        for field in ("from_tenant", "to_tenant"):
            if not getattr(req, field) or len(getattr(req, field)) > 128 or "/" in getattr(req, field):
                raise errors.InvalidArgument.of(field, "is not a tenant name", "1-128 characters, no '/'")
        key = keys.mesh_grant(req.from_tenant, req.to_tenant)
        if req.revoke:
            g = self.grants.pop((req.from_tenant, req.to_tenant), None)
            if g is None:
                raise errors.NotFound(f"no grant from {req.from_tenant} to {req.to_tenant}", kind="mesh grant")
            await self.ctl.writer.write([Delete(key)])
            return g
        g = M.MeshGrant(from_tenant=req.from_tenant, to_tenant=req.to_tenant, created_at=now())
        await self.ctl.writer.write([Put(key, g.SerializeToString())])
        self.grants[(req.from_tenant, req.to_tenant)] = g
        return g

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _with(c: M.MeshConnection, **fields) -> M.MeshConnection:
        out = M.MeshConnection()
        out.CopyFrom(c)
        for k, v in fields.items():
            setattr(out, k, v)
        return out


class MeshService(mesh_service_pb2_grpc.MeshServiceServicer):
    def __init__(self, mesh: MeshManager) -> None:
        self.mesh = mesh

    @unary
    async def Connect(self, request, context):
        return await self.mesh.connect(request)       # with the secret: the caller connected its own slices

    @unary
    async def Get(self, request, context):
        return self.mesh.shown(self.mesh.get(request.id))

    @unary
    async def List(self, request, context):
        tenant = auth.scope_tenant(request.tenant) if request.tenant else ""
        out = [c for c in self.mesh.connections.values()
               if (not tenant or c.tenant == tenant) and self.mesh.visible(c)
               and (not request.slice_id or request.slice_id in (c.slice_a, c.slice_b))]
        out.sort(key=lambda c: (c.created_at.seconds, c.id))
        return M.ListMeshConnectionsResponse(connections=[self.mesh.shown(c) for c in out])

    @unary
    async def Disconnect(self, request, context):
        return self.mesh.shown(await self.mesh.disconnect(request.id))

    @unary
    async def Grant(self, request, context):
        return await self.mesh.grant(request)

    @unary
    async def ListGrants(self, request, context):
        return M.ListMeshGrantsResponse(grants=sorted((g for g in self.mesh.grants.values()
                                                       if auth.visible(g.from_tenant) or auth.visible(g.to_tenant)),
                                                      key=lambda g: (g.from_tenant, g.to_tenant)))
