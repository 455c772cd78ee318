"""The agent tells the control plane when a mesh buffer it holds is unusable: its connection turns FAILED.

A buffer's segment is its tenant's file (docs/security.md): a process that
maps it can shrink it or overwrite its header, and anyone who may write to
/dev/shm's entry can remove its name. The agent survives all of it (it reaches
segments by system calls only, mesh/transport/segment.py), but the buffer is
unusable from then on: one-sided access answers DAMAGED, shm peers cannot
attach it (or fail on the header), and it cannot be recovered after an agent
restart. Before this the connection record stayed READY, so peers kept
opening it and `meshctl mesh get` showed nothing wrong.

The agent finds such a buffer
* when its data plane first meets the damage (TcpDataPlane's `on_damaged`);
* by an audit of the buffers it holds, when each Sync stream opens and every
  AUDIT_S seconds after: the segment's size, its header as the agent wrote it
  (magic, key, state, length, owner pid, the connection's tag: what peers
  check), and whether its name is still in /dev/shm (or the slice's link).
  Peers that map an shm buffer never pass through the agent, so without the
  audit nothing would notice a shrink that only they meet.

It then sends `MeshBufferFailed` (mesh_service.proto) on the current Sync
stream, again on every new stream while it holds the buffer, and logs a WARNING.
The control plane turns the connection FAILED with the message
(controlplane/api/meshsvc.py `on_buffer_failed`); a recovery asked for that
buffer answers "gone". A deregistration forgets it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from gpumesh.v1 import mesh_service_pb2 as M
from gpumesh.v1 import node_service_pb2
from mesh.logs import log
from mesh.transport import shm
from mesh.transport.base import BufferDamaged

logger = logging.getLogger(__name__)
AUDIT_S = 5.0


def region_damage(region: shm.ShmRegion) -> BufferDamaged | None:
    """None while `region`'s segment is whole (its size, its header as its owner wrote it), else the error."""
    seg = region.segment
    if seg is None:
        return None
    e = seg.damage("audit")
    if e is not None:
        return e
    try:
        head = seg.read_header(shm.HEAD)
    except BufferDamaged as e:
        return e
    magic, rkey, state, size, pid = shm.HEADER.unpack_from(head)
    (tag,) = shm.TAG.unpack_from(head, shm.HEADER.size)
    if (magic, rkey, state, size, pid) == (shm.MAGIC, region.rkey, shm.ACTIVE, region.length, os.getpid()) \
            and tag == region.tag:
        return None
    return BufferDamaged(f"buffer {region.buffer_id}: its segment's header was overwritten (magic {magic!r}, state "
                         f"{state}, length {size}, owner pid {pid}{', another tag' if tag != region.tag else ''}) by "
                         f"a process that maps it; the buffer is unusable: disconnect and connect again",
                         op="audit", buffer_id=region.buffer_id, size=seg.size(), expected=seg.needed,
                         reason="header")


class BufferHealth:
    """The registrar's unusable buffers: found, reported, reported again on a new stream."""

    def __init__(self, registrar) -> None:
        self.r = registrar
        self.failed: dict[str, M.MeshBufferFailed] = {}
        self._unsent: set[str] = set()
        self._lock = threading.Lock()           # the data plane reports from its serving threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox = None
        self._task: asyncio.Task | None = None

    def attach(self, outbox) -> None:
        """A new Sync stream (after the MeshHello): audit now, report every failed buffer on it, keep auditing."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:                 # (a test's stream without a loop: no audits after this one)
            self._loop = None
        self._outbox = outbox
        with self._lock:
            self._unsent = set(self.failed)
        self.audit()
        self.flush()
        if self._loop is not None and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._audit_forever(), name=f"mesh-audit-{self.r.node}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def fail(self, buffer_id: str, reason: str, message: str) -> None:
        """Buffer `buffer_id` is unusable (any thread): report it once (and on every new stream)."""
        held = self.r.buffers.get(buffer_id)
        if held is None:
            return
        with self._lock:
            # (looked up again under the lock: a deregistration on the agent's loop, pop then forget, that ran
            # since the look-up above would otherwise leave this failure recorded for a buffer no longer held)
            if buffer_id in self.failed or self.r.buffers.get(buffer_id) is not held:
                return
            self.failed[buffer_id] = M.MeshBufferFailed(
                buffer_id=buffer_id, connection_id=held.connection_id, slice_id=held.descriptor.slice_id,
                reason=reason, message=message)
            self._unsent.add(buffer_id)
        log(logger, logging.WARNING, "mesh buffer unusable: its connection is reported FAILED", node=self.r.node,
            buffer=buffer_id, connection=held.connection_id, slice=held.descriptor.slice_id, reason=reason,
            error=message)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.flush)
            except RuntimeError:             # the loop closed meanwhile: the next stream reports it
                pass

    def failure(self, buffer_id: str) -> M.MeshBufferFailed | None:
        with self._lock:
            return self.failed.get(buffer_id)

    def forget(self, buffer_id: str) -> None:
        with self._lock:
            self.failed.pop(buffer_id, None)
            self._unsent.discard(buffer_id)

    def flush(self) -> None:
        """Send the reports not sent on the current stream (on the agent's loop)."""
        if self._outbox is None:
            return
        with self._lock:
            todo = [self.failed[b] for b in sorted(self._unsent) if b in self.failed]
            self._unsent.clear()
        for msg in todo:
            self._outbox.put_nowait(node_service_pb2.AgentMessage(mesh_buffer_failed=msg))

    def audit(self) -> None:
        """Check every held buffer's segment: damaged (size, header) or removed from /dev/shm."""
        for bid, held in list(self.r.buffers.items()):
            if held.region is None or self.failure(bid) is not None:
                continue
            e = region_damage(held.region)
            if e is not None:
                served = self.r.server.regions.by_id.get(bid)
                if served is not None:
                    self.r.server.regions.mark_damaged(served, e)     # counted, logged, one-sided access refused, fail()
                self.fail(bid, e.reason or "shrunk", e.message)
            elif not self.r._present({"slice_id": held.descriptor.slice_id, "shm_name": held.region.name}):
                self.fail(bid, "gone", f"buffer {bid}: its shared memory segment /dev/shm/{held.region.name} was "
                                       f"removed: its memory lives on only in the mappings that exist (nothing can "
                                       f"attach it again, and it cannot survive an agent restart); disconnect and "
                                       f"connect again")

    async def _audit_forever(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_S)
            try:
                self.audit()
            except Exception:   # noqa: BLE001 - the next round tries again
                logger.exception("mesh buffer audit")
