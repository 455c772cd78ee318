"""One data-plane request after its header was read: the checks, the copy and the reply.

`RequestHandler.handle` answers each op of `mesh.transport.wire` on the regions
of a `RegionTable`: WRITE/READ within a region's bounds (payloads go straight
between the socket and the region), SEND into its inbox (at most MAX_QUEUED
messages and MAX_QUEUED_BYTES bytes, then QUEUE_FULL), RECV from it, and
RDMA_WRITE/RDMA_READ through the `rdma` hook. A refused request that carries a
payload has it drained first, so the stream stays in step. Regions over a
tenant's shared memory segment are reached by system calls only
(`mesh.transport.segment`), their size checked before each WRITE/READ.
"""

from __future__ import annotations

import socket

from mesh.transport.base import BufferDamaged, InvalidKey, OutOfBounds, PeerGone, Revoked, TransportError
from mesh.transport.regions import Region, RegionTable, slice_of
from mesh.transport.segment import recv_into_segment, send_from_segment
from mesh.transport.wire import (BAD_REQUEST, DAMAGED, DRAIN_LIMIT, EMPTY, INVALID_KEY, MAX_MESSAGE, MAX_QUEUED,
                                 MAX_QUEUED_BYTES, NOT_AUTHORIZED, OK, OPS, OUT_OF_BOUNDS, PEER_GONE, PING, QP_ERROR,
                                 QUEUE_FULL, RDMA_READ, RDMA_WRITE, READ, RECV, RESP, REVOKED, SEND, WRITE, recv_exact)


class RequestHandler:
    """Answers requests on `regions`; `rdma`: the hook that serves RDMA_WRITE/RDMA_READ (None: refused)."""

    def __init__(self, regions: RegionTable, rdma=None) -> None:
        self.regions, self.rdma = regions, rdma

    def handle(self, sock: socket.socket, op: int, tag: int, rkey: int, addr: int, length: int, scope: str = "",
               remote: bool = False) -> bool:
        """Answer one request; False when the connection must close."""
        if op == PING:
            self._reply(sock, OK, tag)
            return True
        if op not in OPS:
            self._reply(sock, BAD_REQUEST, tag, f"unknown op {op}")
            return False
        region, status, why = self.regions.lookup(rkey, scope)
        carries = op in (WRITE, SEND, RDMA_WRITE)
        if region is not None and op in (RDMA_WRITE, RDMA_READ):
            return self._rdma(sock, op, tag, region, addr, length, remote)
        if region is not None and region.local_only and remote and op in (WRITE, READ):
            status, why = NOT_AUTHORIZED, (f"buffer {region.buffer_id} is registered for RDMA: other hosts reach it "
                                        f"with RDMA WRITE/READ through their own buffer's agent, not over TCP")
        elif region is not None and op in (WRITE, READ):
            off = addr - region.base
            if addr < region.base or off + length > region.length:
                status, why = OUT_OF_BOUNDS, (f"{OPS[op]} of {length} bytes at offset {off} is outside buffer "
                                              f"{region.buffer_id} of {region.length} bytes")
        elif region is not None and op == SEND and length > MAX_MESSAGE:
            status, why = BAD_REQUEST, f"message of {length} bytes is over the {MAX_MESSAGE}-byte limit"
        if status == OK and region.segment is not None and op in (WRITE, READ):
            status, why = self._segment_ok(region, OPS[op])
        if status != OK:
            if carries and not self._drain(sock, length):
                self._reply(sock, status, tag, why)
                return False
            self._reply(sock, status, tag, why)
            return True
        if region.segment is not None and op in (WRITE, READ):
            return self._segment_op(sock, op, tag, region, addr - region.base, length)
        if op in (WRITE, READ):
            off = addr - region.base
            view = slice_of(region, off, length)
            if view is None:
                return self._gone(sock, op, tag, region, length)
            if op == WRITE:
                recv_exact(sock, view)
                self._reply(sock, OK, tag)
            else:
                sock.sendall(RESP.pack(OK, tag, length))
                sock.sendall(view)
        elif op == SEND:
            return self._send(sock, tag, region, length)
        elif op == RECV:
            timeout = addr / 1000.0
            with region.cond:
                region.cond.wait_for(lambda: region.inbox or rkey not in self.regions.by_key, timeout)
                msg = region.inbox.popleft() if region.inbox else None
                if msg is not None:
                    region.queued -= len(msg)
            if msg is None:
                gone = rkey not in self.regions.by_key
                self._reply(sock, REVOKED if gone else EMPTY, tag, f"buffer {region.buffer_id} was deregistered"
                            if gone else "")
            else:
                self._reply(sock, OK, tag, msg)
        return True

    def _reply(self, sock: socket.socket, status: int, tag: int, payload=b"") -> None:
        payload = payload.encode() if isinstance(payload, str) else payload
        n = memoryview(payload).nbytes
        if n <= 65536:
            sock.sendall(RESP.pack(status, tag, n) + bytes(payload))
        else:
            sock.sendall(RESP.pack(status, tag, n))
            sock.sendall(payload)

    def _gone(self, sock: socket.socket, op: int, tag: int, region: Region, length: int) -> bool:
        """Answer REVOKED for a region deregistered since its lookup (a WRITE's payload drained first, so the
        stream stays in step); False when the connection must close instead."""
        if op == WRITE and not self._drain(sock, length):
            return False
        self._reply(sock, REVOKED, tag, f"buffer {region.buffer_id} was deregistered")
        return True

    def _drain(self, sock: socket.socket, length: int) -> bool:
        if length > DRAIN_LIMIT:
            return False
        scratch = memoryview(bytearray(min(length, 1 << 20)))
        while length:
            k = min(length, scratch.nbytes)
            recv_exact(sock, scratch[:k])
            length -= k
        return True

    def _send(self, sock: socket.socket, tag: int, region: Region, length: int) -> bool:
        """SEND: queue a message in the region's inbox. Its bytes are reserved before they are received, so
        the inbox with the messages on their way stays within MAX_QUEUED_BYTES (and MAX_QUEUED messages);
        over either, the payload is drained and the answer is QUEUE_FULL."""
        with region.cond:
            full = len(region.inbox) >= MAX_QUEUED or region.queued + length > MAX_QUEUED_BYTES
            if not full:
                region.queued += length
        if full:
            if not self._drain(sock, length):
                return False
            self._reply(sock, QUEUE_FULL, tag, f"buffer {region.buffer_id}'s inbox is full")
            return True
        msg = bytearray(length)
        try:
            recv_exact(sock, memoryview(msg))
        except BaseException:
            with region.cond:
                region.queued -= length
            raise
        with region.cond:
            if len(region.inbox) >= MAX_QUEUED:
                region.queued -= length
                full = True
            else:
                region.inbox.append(bytes(msg))
                region.cond.notify()
        if full:
            self._reply(sock, QUEUE_FULL, tag, f"buffer {region.buffer_id}'s inbox is full")
        else:
            self._reply(sock, OK, tag)
        return True

    # -- regions over a tenant's segment ---------------------------------------------------------

    def _segment_ok(self, region: Region, op: str) -> tuple[int, str]:
        if not region.damaged:
            e = region.segment.damage(op)
            if e is None:
                return OK, ""
            self.regions.mark_damaged(region, e)
        return DAMAGED, region.damaged

    def _segment_op(self, sock: socket.socket, op: int, tag: int, region: Region, off: int, length: int) -> bool:
        """WRITE/READ on a region over a tenant's segment, by system calls only (mesh.transport.segment)."""
        view = slice_of(region, off, length)
        if view is None:
            return self._gone(sock, op, tag, region, length)
        if op == WRITE:
            e = recv_into_segment(sock, region.segment, view, off, length)
            if e is not None:
                self.regions.mark_damaged(region, e)
                self._reply(sock, DAMAGED, tag, region.damaged)
            else:
                self._reply(sock, OK, tag)
            return True
        sock.sendall(RESP.pack(OK, tag, length))
        e = send_from_segment(sock, region.segment, view, off, length)
        if e is not None:                 # shrunk during the copy: the reply is cut short, the channel closes
            self.regions.mark_damaged(region, e)
            return False
        return True

    def _rdma(self, sock: socket.socket, op: int, tag: int, region: Region, offset: int, length: int,
              remote: bool) -> bool:
        """RDMA_WRITE / RDMA_READ: the caller (on this host, with its own buffer's key) asks for a one-sided
        operation on the peer's buffer, done by this agent on the buffer's connected queue pair."""
        name = OPS[op]
        status, why = OK, ""
        if self.rdma is None or remote:
            status, why = NOT_AUTHORIZED, ("RDMA operations are posted by the agent of the caller's own buffer, "
                                        "from its host" if remote else "this agent has no RDMA device")
        else:
            status, why = self.rdma.check(region, name, offset, length)
        if status != OK:
            if op == RDMA_WRITE and not self._drain(sock, length):
                self._reply(sock, status, tag, why)
                return False
            self._reply(sock, status, tag, why)
            return True
        try:
            if op == RDMA_WRITE:
                payload = bytearray(length)
                recv_exact(sock, memoryview(payload))
                self.rdma.write(region, offset, payload)
                self._reply(sock, OK, tag)
            else:
                self._reply(sock, OK, tag, self.rdma.read(region, offset, length))
        except TransportError as e:
            self._reply(sock, status_of(e), tag, e.message)
        return True


def status_of(e: TransportError) -> int:
    """The wire status that answers a typed transport error."""
    from mesh.transport.base import QueuePairError
    if isinstance(e, InvalidKey):
        return INVALID_KEY
    if isinstance(e, OutOfBounds):
        return OUT_OF_BOUNDS
    if isinstance(e, Revoked):
        return REVOKED
    if isinstance(e, PeerGone):
        return PEER_GONE
    if isinstance(e, QueuePairError):
        return QP_ERROR
    if isinstance(e, BufferDamaged):
        return DAMAGED
    return BAD_REQUEST
