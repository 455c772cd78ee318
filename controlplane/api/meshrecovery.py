"""Mesh connections come back after an agent restarts (or both do, or the control plane too).

An agent's buffers are shared memory segments that outlive the agent process
(mesh/transport/shm.py); what dies with it is its registration: the data-plane
entry (a new port, a new TLS certificate), and for verbs the memory region and
the queue pair. When an agent's new Sync stream says (`MeshHello.buffers`) that
it no longer holds a connection's buffer, or the connection was left
RECOVERING (the control plane restarted in the middle), the connection turns
RECOVERING and both agents are asked to register their side again with
`MeshRegister.recover` — the same request as Connect's, with the same
connection id and secret: the restarted agent re-adopts the segment (bytes and
shm key kept), the other answers its descriptor unchanged (tcp, shm) or, for
verbs, both make a new MR over the surviving memory and a new RC queue pair,
and the control plane introduces the new QPs (`MeshPeer`: RESET -> INIT -> RTR
-> RTS), exactly as Connect does. The new descriptors are stored in etcd and
the connection is READY again.

A buffer whose memory is gone (segment removed, slice torn down, a cuda_ipc
buffer, which is device memory of the dead process) turns the connection FAILED
with the reason, and so does a buffer its agent reports unusable while it holds
it (`MeshBufferFailed`: its segment damaged or removed, nodeagent/meshhealth.py).
An agent that is away leaves the connection RECOVERING: its next MeshHello
resumes it. Disconnect and slice releases win: a recovery never
writes back a connection that is being or was disconnected, and buffers it
re-registered for one are revoked.
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.api.meshchoice import data_path, same_host
from controlplane.state import keys
from controlplane.state.store import Present, Put
from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import types_pb2
from mesh import errors
from mesh.logs import log

logger = logging.getLogger(__name__)
READY, FAILED, RECOVERING = (M.MESH_CONNECTION_STATE_READY, M.MESH_CONNECTION_STATE_FAILED,
                             M.MESH_CONNECTION_STATE_RECOVERING)
RETRY_S = 2.0
RETRIES = 30                # 2 s apart: a minute for the agents and their slices to come back
# an agent's answer that means the buffer's memory is not there any more (vs. a transient failure)
UNRECOVERABLE = (errors.FailedPrecondition, errors.NotFound, errors.InvalidArgument)


class MeshRecovery:
    def __init__(self, mgr) -> None:
        self.mgr = mgr
        self.tasks: dict[str, asyncio.Task] = {}
        self.again: set[str] = set()

    def needs(self, c: M.MeshConnection, node: str, held: set[str]) -> bool:
        """Whether the hello of `node` (holding `held`) calls for recovering `c`."""
        if c.state == RECOVERING:
            return True
        return c.state == READY and any(d.node == node and d.buffer_id not in held for d in (c.a, c.b))

    def schedule(self, cid: str, why: str) -> None:
        """Recover `cid` in the background (the Sync reader that delivered the hello must go on reading the
        agents' answers); once at a time per connection, again if asked meanwhile."""
        task = self.tasks.get(cid)
        if task is not None and not task.done():
            self.again.add(cid)
            return
        self.tasks[cid] = asyncio.create_task(self._run(cid, why), name=f"mesh-recover-{cid}")

    async def stop(self) -> None:
        for t in list(self.tasks.values()):
            t.cancel()

    async def _run(self, cid: str, why: str) -> None:
        try:
            for attempt in range(RETRIES):
                self.again.discard(cid)
                try:
                    outcome = await self.recover(cid, why)
                except asyncio.CancelledError:
                    raise
                except Exception as e:   # noqa: BLE001 - a failed write: retried below or by the next hello
                    log(logger, logging.WARNING, "mesh recovery failed", connection=cid, error=repr(e))
                    outcome = "retry"
                if cid in self.again:
                    continue
                if outcome != "retry" or not self._agents_connected(cid):
                    return             # done, or waiting for an agent whose hello resumes it
                await asyncio.sleep(RETRY_S)
        finally:
            if self.tasks.get(cid) is asyncio.current_task():
                self.tasks.pop(cid, None)

    def _agents_connected(self, cid: str) -> bool:
        c = self.mgr.connections.get(cid)
        return c is not None and all(self.mgr.ctl.sessions.get(d.node) is not None for d in (c.a, c.b))

    def _live(self, cid: str) -> M.MeshConnection | None:
        """The connection if it is still wanted (`_gone` says no)."""
        return None if self._gone(cid) else self.mgr.connections.get(cid)

    def _gone(self, cid: str) -> bool:
        """Whether the connection is no longer wanted: disconnected (or being), or a slice of it released,
        failed or gone. A slice not READY for now (UNKNOWN while its node was away, until the node's report)
        is not gone: the recovery waits for it and revokes nothing."""
        c = self.mgr.connections.get(cid)
        if c is None or cid in self.mgr.closing or c.state not in (READY, RECOVERING):
            return True
        for sid in (c.slice_a, c.slice_b):
            s = self.mgr.ctl.fleet.slices.get(sid)
            if s is None or s.state in (types_pb2.SLICE_STATE_RELEASING, types_pb2.SLICE_STATE_FAILED):
                return True          # released (the release follower disconnects it)
        return False

    def _slices_ready(self, c: M.MeshConnection) -> bool:
        return all(getattr(self.mgr.ctl.fleet.slices.get(sid), "state", None) == types_pb2.SLICE_STATE_READY
                   for sid in (c.slice_a, c.slice_b))

    async def _store(self, c: M.MeshConnection) -> bool:
        """Write `c` over its record if the connection still exists; never brings back a disconnected one."""
        if self._live(c.id) is None:
            return False
        try:
            await self.mgr.ctl.writer.write([Put(keys.mesh(c.id), c.SerializeToString())], [Present(keys.mesh(c.id))])
        except errors.Aborted:
            return False             # deleted meanwhile (a disconnect)
        if c.id in self.mgr.connections and c.id not in self.mgr.closing:
            self.mgr.connections[c.id] = c
            return True
        return False

    async def recover(self, cid: str, why: str) -> str:
        """One attempt: "ready", "failed", "gone" (no longer wanted) or "retry"."""
        c = self._live(cid)
        if c is None:
            return "gone"
        if c.state != RECOVERING:
            c = self.mgr._with(c, state=RECOVERING, message=f"{why}: re-registering the buffers over their memory")
            if not await self._store(c):
                return "gone"
            log(logger, logging.INFO, "mesh connection recovering", connection=cid, why=why)
        if not self._agents_connected(cid):
            return "retry"
        if not self._slices_ready(c):
            await self._note(cid, f"{why}: waiting for its slices to be READY again")
            return "retry"
        sides = [(c.slice_a, c.a), (c.slice_b, c.b)]
        results = await asyncio.gather(*(self.mgr._ask(
            d.node, f"recover buffer {d.buffer_id} of slice {sid}", mesh_register=M.MeshRegister(
                connection_id=cid, slice_id=sid, size_bytes=c.size_bytes, transport=c.transport, secret=c.secret,
                recover=True)) for sid, d in sides), return_exceptions=True)
        if self._live(cid) is None:
            self._revoke_late(cid, results)
            return "gone"
        for (sid, d), r in zip(sides, results):
            if isinstance(r, UNRECOVERABLE):
                await self.fail(cid, d.buffer_id, f"buffer {d.buffer_id} of slice {sid} on node {d.node} cannot be "
                                                  f"recovered: {r.message if isinstance(r, errors.MeshError) else r}; "
                                                  f"disconnect and connect again")
                return "failed"
        if any(isinstance(r, BaseException) for r in results):
            error = str(next(r for r in results if isinstance(r, BaseException)))
            log(logger, logging.INFO, "mesh recovery waits for an agent", connection=cid, error=error)
            await self._note(cid, f"{why}: waiting to re-register: {error}")
            return "retry"
        da, db = results[0].descriptor, results[1].descriptor
        if c.transport == "verbs":
            peered = await asyncio.gather(
                self.mgr._ask(da.node, f"connect the queue pair of {da.buffer_id}",
                              mesh_peer=M.MeshPeer(buffer_id=da.buffer_id, peer=db)),
                self.mgr._ask(db.node, f"connect the queue pair of {db.buffer_id}",
                              mesh_peer=M.MeshPeer(buffer_id=db.buffer_id, peer=da)), return_exceptions=True)
            bad = [p for p in peered if isinstance(p, BaseException)]
            if bad:
                log(logger, logging.WARNING, "mesh recovery: queue pairs not connected", connection=cid,
                    error=str(bad[0]))
                await self._note(cid, f"{why}: waiting to connect the new queue pairs: {bad[0]}")
                return "retry"        # the next attempt makes new MRs and QPs on both sides
        current = self._live(cid)
        if current is None:
            self._revoke_late(cid, results)
            return "gone"
        ha, hb = self.mgr.hellos.get(da.node, M.MeshHello()), self.mgr.hellos.get(db.node, M.MeshHello())
        ready = self.mgr._with(current, state=READY, message=f"recovered ({why})",
                               data_path=data_path(c.transport, da.node == db.node or same_host(da, db),
                                                   ha.tls and hb.tls))
        ready.a.CopyFrom(da)
        ready.b.CopyFrom(db)
        if not await self._store(ready):
            self._revoke_late(cid, results)
            return "gone"
        log(logger, logging.INFO, "mesh connection recovered", connection=cid, transport=c.transport,
            buffer_a=da.buffer_id, buffer_b=db.buffer_id)
        return "ready"

    async def fail(self, cid: str, buffer_id: str, message: str) -> bool:
        """Turn a READY or RECOVERING connection FAILED with `message` (a buffer of it cannot be used: it was not
        recovered, or its agent found it damaged or removed); False when it is no longer wanted (or already
        FAILED). A recovery in flight then writes nothing back (`_gone`)."""
        c = self._live(cid)
        if c is None or not await self._store(self.mgr._with(c, state=FAILED, message=message)):
            return False
        log(logger, logging.WARNING, "mesh connection failed", connection=cid, buffer=buffer_id, error=message)
        return True

    async def _note(self, cid: str, message: str) -> None:
        """Say in the stored RECOVERING connection what it waits for (`meshctl describe connection`)."""
        c = self._live(cid)
        if c is not None and c.state == RECOVERING and c.message != message:
            await self._store(self.mgr._with(c, message=message))

    def _revoke_late(self, cid: str, results) -> None:
        """The connection went away while its buffers were re-registered: revoke what was registered."""
        for r in results:
            if isinstance(r, M.MeshRegistered) and r.descriptor.buffer_id:
                self.mgr._send(r.descriptor.node, mesh_deregister=M.MeshDeregister(
                    buffer_ids=[r.descriptor.buffer_id], reason=f"connection {cid} closed while recovering"))
