"""The agent's TCP data-plane server: serves registered regions, checks keys and bounds.

See `mesh.transport.tcp` for the framing and `mesh.transport.channel` for the
handshake every channel starts with (TLS across hosts, the per-connection
secret). One thread per peer connection, at most MAX_CONNECTIONS (a connection
past them is closed at once, and running out of descriptors only pauses
accepting); payloads go straight between the socket and the region
(`recv_into` / `sendall` of slices). A buffer's SEND inbox holds at most
MAX_QUEUED messages and MAX_QUEUED_BYTES bytes (then QUEUE_FULL).

A channel authenticated for one connection's buffer reaches only the regions of
that connection (`scope`); keys of others read as unknown. Regions registered
for RDMA (`local_only`) are not served one-sided to other hosts: their peers
reach them with RDMA. `RDMA_WRITE` / `RDMA_READ` ask this agent to move bytes
between the caller's buffer's connected queue pair and its peer (the `rdma` hook,
the registrar's verbs links).

A region over a tenant's shared memory segment (`segment`) is reached only
through system calls (`mesh.transport.segment`): the tenant may shrink the
file at any time, and a user-mode copy from or into its mapping would kill
this process with SIGBUS. Before each WRITE/READ the segment's size is
checked; a shrunk one marks the region damaged (every later one-sided
operation on it answers DAMAGED, the client's `BufferDamaged`), logs a WARNING
naming the buffer, slice and tenant and counts
`gpumesh_mesh_buffers_damaged_total`. Other regions and channels go on.
"""

from __future__ import annotations

import collections
import errno
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from mesh.logs import log
from mesh.transport import channel
from mesh.transport.base import BufferDamaged, InvalidKey, OutOfBounds, PeerGone, Revoked, TransportError, new_key
from mesh.transport.segment import Segment, recv_into_segment, send_from_segment
from mesh.transport.wire import (BAD_REQUEST, DAMAGED, DRAIN_LIMIT, EMPTY, INVALID_KEY, MAX_MESSAGE, MAX_QUEUED,
                                 MAX_QUEUED_BYTES, OK, OPS, NOT_AUTHORIZED, OUT_OF_BOUNDS, PEER_GONE, PING, QP_ERROR,
                                 QUEUE_FULL, RDMA_READ, RDMA_WRITE, READ, RECV, REQ, RESP, REVOKED, REVOKED_KEPT, SEND,
                                 WRITE, recv_exact, tune)

logger = logging.getLogger(__name__)
DAMAGED_BUFFERS = Counter("gpumesh_mesh_buffers_damaged_total", "Mesh buffers found damaged by a process that maps "
                          "their segment (reason: shrunk, header)", ["reason"])
CONNECTIONS_DROPPED = Counter("gpumesh_mesh_dataplane_connections_dropped_total", "Data-plane connections closed "
                              "at once because MAX_CONNECTIONS were open (reason: limit)", ["reason"])

MAX_CONNECTIONS = 1024          # open peer connections (one thread each); the next is closed at once
ACCEPT_RETRY_S = 0.1            # pause after accept() ran out of descriptors or memory, before trying again
ACCEPT_LOG_EVERY_S = 10.0       # at most one log line per this many seconds for those (and for dropped ones)
# accept() errors a connection flood causes (or a peer resetting before it was accepted): they pass, so
# the data plane goes on accepting; any other error (EINVAL/EBADF: close() shut the listener) ends it
ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED})


@dataclass
class Region:
    buffer_id: str
    slice_id: str
    rkey: int
    base: int
    data: memoryview
    scope: str = ""             # the connection it belongs to ("" when registered without a secret)
    secret: bytes = b""         # the connection's secret (channels authenticate with it)
    local_only: bool = False    # RDMA buffers: one-sided access from this host only (peers use RDMA)
    segment: Segment | None = None   # the tenant's shm segment under `data`: reached by system calls only
    tenant: str = ""            # whose segment it is (for the log line when it is damaged)
    damaged: str = ""           # why its segment can no longer be used ("": it can)
    inbox: collections.deque = field(default_factory=collections.deque)
    queued: int = 0             # bytes of SEND messages in `inbox` or being received into it (under `cond`)
    cond: threading.Condition = field(default_factory=threading.Condition)
    length: int = field(init=False)     # kept: a deregistration releases `data` while requests may read this

    def __post_init__(self) -> None:
        self.length = self.data.nbytes


def _slice(region: Region, off: int, length: int) -> memoryview | None:
    """The region's bytes [off, off+length), taken once per request: a deregistration releases `region.data`
    (remove()), not this slice, so a copy under way finishes; None when it was released before."""
    try:
        return region.data[off:off + length]
    except ValueError:
        return None


class TcpDataPlane:
    """The agent's data-plane server: one thread per peer connection, at most MAX_CONNECTIONS of them."""

    def __init__(self, listen_host: str = "0.0.0.0", port: int = 0, advertise_host: str = "127.0.0.1",
                 identity: channel.TlsIdentity | None = None, require_tls_remote: bool = False, rdma=None, *,
                 refuse_unscoped: bool = False, on_damaged=None) -> None:
        """`identity`: TLS certificate for channels from other hosts (None: plaintext only);
        `require_tls_remote`: refuse plaintext from other hosts; `rdma`: the hook that serves
        RDMA_WRITE/RDMA_READ (`check(region, op, offset, length)`, `write(region, offset, view)`,
        `read(region, offset, length)`), None: those ops are refused; `refuse_unscoped`: refuse channels
        that prove no connection secret (for a plane whose every buffer has one, like the agent's: such a
        channel reaches nothing and would only hold a connection open); `on_damaged(region, error)`: called
        (in a serving thread) when a region is first found damaged (the agent reports its buffer failed)."""
        self.identity, self.require_tls_remote, self.rdma = identity, require_tls_remote, rdma
        self.on_damaged = on_damaged
        self.refuse_unscoped = refuse_unscoped
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.by_id: dict[str, Region] = {}
        self._lsock = socket.create_server((listen_host, port), backlog=128, reuse_port=False)
        self.port = self._lsock.getsockname()[1]
        self.endpoint = f"{advertise_host}:{self.port}"
        self.regions: dict[int, Region] = {}
        self.revoked: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="mesh-dataplane", daemon=True)
        self._thread.start()

    # -- regions ------------------------------------------------------------------------

    @property
    def tls_sha256(self) -> bytes:
        return self.identity.sha256 if self.identity is not None else b""

    def add(self, buffer_id: str, slice_id: str, data, rkey: int = 0, base: int = 0, *, scope: str = "",
            secret: bytes = b"", local_only: bool = False, segment: Segment | None = None,
            tenant: str = "") -> Region:
        """Serve `data` (a writable bytes-like) under a key; the region (with its base address:
        `base`, e.g. a verbs MR's address, or a random one). With `secret`, only channels that
        authenticated with it for a buffer of `scope` (the connection) reach it. `segment`: `data` is
        the mapping of that shared memory segment, which another process (`tenant`'s) can shrink."""
        mv = memoryview(data).cast("B")
        if mv.readonly:
            raise TransportError(f"buffer {buffer_id} is read-only", op="register", buffer_id=buffer_id)
        if bool(scope) != bool(secret):
            raise TransportError(f"buffer {buffer_id}: a scope needs a secret and a secret a scope", op="register",
                                 buffer_id=buffer_id)
        base = base or (secrets.randbits(32) + 1) << 16
        region = Region(buffer_id, slice_id, rkey or new_key(), base, mv, scope, secret, local_only, segment,
                        tenant)
        with self._lock:
            self.regions[region.rkey] = region
            self.by_id[buffer_id] = region
        return region

    def _secret_of(self, buffer_id: str) -> tuple[str, bytes] | None:
        region = self.by_id.get(buffer_id)
        return (region.scope, region.secret) if region is not None and region.secret else None

    def remove(self, rkey: int) -> None:
        """Revoke a key: later requests with it answer REVOKED; waiting receivers wake up."""
        with self._lock:
            region = self.regions.pop(rkey, None)
            if region is None:
                return
            if self.by_id.get(region.buffer_id) is region:
                del self.by_id[region.buffer_id]
            self.revoked[rkey] = (region.buffer_id, region.scope)
            while len(self.revoked) > REVOKED_KEPT:
                self.revoked.popitem(last=False)
        with region.cond:
            region.queued -= sum(len(m) for m in region.inbox)
            region.inbox.clear()
            region.cond.notify_all()
        try:
            region.data.release()     # in-flight operations keep their own slices of it
        except BufferError:
            pass

    # -- serving ------------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept until close(): running out of descriptors or memory (a connection flood) pauses and
        retries instead of ending the data plane; past MAX_CONNECTIONS a new connection is closed at once."""
        logged, errors, dropped = 0.0, 0, 0
        while not self._closing:
            try:
                sock, _ = self._lsock.accept()
            except OSError as e:
                if self._closing or e.errno not in ACCEPT_TRANSIENT:
                    return                     # close() shut the listener (EINVAL, then EBADF)
                errors += 1
                if time.monotonic() - logged >= ACCEPT_LOG_EVERY_S:
                    logged = time.monotonic()
                    log(logger, logging.WARNING, "mesh data plane cannot accept connections for now: retrying",
                        error=e.strerror or str(e), errno=e.errno, errors=errors, open=len(self._conns))
                time.sleep(ACCEPT_RETRY_S)
                continue
            if not self._slots.acquire(blocking=False):
                CONNECTIONS_DROPPED.labels("limit").inc()      # counted before the peer can see the close
                sock.close()
                dropped += 1
                if time.monotonic() - logged >= ACCEPT_LOG_EVERY_S:
                    logged = time.monotonic()
                    log(logger, logging.WARNING, "mesh data plane at its connection limit: closed a new connection",
                        limit=MAX_CONNECTIONS, dropped=dropped)
                continue
            try:
                tune(sock)
                threading.Thread(target=self._serve_slot, args=(sock,), name="mesh-dataplane-conn",
                                 daemon=True).start()
            except (OSError, RuntimeError) as e:     # RuntimeError: no thread could be started
                self._slots.release()
                sock.close()
                log(logger, logging.WARNING, "mesh data plane could not serve a connection", error=str(e))

    def _serve_slot(self, raw: socket.socket) -> None:
        try:
            self._serve(raw)
        finally:
            self._slots.release()

    def _serve(self, raw: socket.socket) -> None:
        opened = channel.server_accept(raw, identity=self.identity, require_tls_remote=self.require_tls_remote,
                                       secret_of=self._secret_of, allow_unscoped=not self.refuse_unscoped)
        if opened is None:
            return
        sock, scope = opened
        remote = not channel.same_host(sock)
        with self._lock:
            if self._closing:
                sock.close()
                return
            self._conns.add(sock)
        hdr = bytearray(REQ.size)
        hv = memoryview(hdr)
        try:
            while True:
                try:
                    recv_exact(sock, hv)
                except (ConnectionError, OSError):
                    return
                op, _, _, tag, rkey, addr, length = REQ.unpack(hdr)
                try:
                    if not self._handle(sock, op, tag, rkey, addr, length, scope, remote):
                        return
                except (ConnectionError, OSError):
                    return
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _lookup(self, rkey: int, scope: str) -> tuple[Region | None, int, str]:
        region = self.regions.get(rkey)
        if region is not None and region.scope == scope:
            return region, OK, ""
        gone = self.revoked.get(rkey)
        if region is None and gone is not None and gone[1] == scope:
            return None, REVOKED, f"buffer {gone[0]} was deregistered"
        return None, INVALID_KEY, "no region has this key"     # also: a key of another connection

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

    def _handle(self, sock: socket.socket, op: int, tag: int, rkey: int, addr: int, length: int, scope: str = "",
                remote: bool = False) -> bool:
        if op == PING:
            self._reply(sock, OK, tag)
            return True
        if op not in OPS:
            self._reply(sock, BAD_REQUEST, tag, f"unknown op {op}")
            return False
        region, status, why = self._lookup(rkey, scope)
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
            view = _slice(region, off, length)
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
                region.cond.wait_for(lambda: region.inbox or rkey not in self.regions, timeout)
                msg = region.inbox.popleft() if region.inbox else None
                if msg is not None:
                    region.queued -= len(msg)
            if msg is None:
                gone = rkey not in self.regions
                self._reply(sock, REVOKED if gone else EMPTY, tag, f"buffer {region.buffer_id} was deregistered"
                            if gone else "")
            else:
                self._reply(sock, OK, tag, msg)
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
            self.mark_damaged(region, e)
        return DAMAGED, region.damaged

    def mark_damaged(self, region: Region, e: BufferDamaged) -> None:
        """From now on `region`'s one-sided operations answer DAMAGED; the first time: counted, logged, reported."""
        with self._lock:
            first, region.damaged = not region.damaged, region.damaged or e.message
        if first:
            DAMAGED_BUFFERS.labels(e.reason or "shrunk").inc()
            log(logger, logging.WARNING, "mesh buffer damaged by a process that maps its segment: its one-sided "
                "operations fail from now on", buffer=region.buffer_id, slice=region.slice_id, tenant=region.tenant,
                size=e.size, expected=e.expected, reason=e.reason, op=e.op)
            if self.on_damaged is not None:
                self.on_damaged(region, e)

    def _segment_op(self, sock: socket.socket, op: int, tag: int, region: Region, off: int, length: int) -> bool:
        """WRITE/READ on a region over a tenant's segment, by system calls only (mesh.transport.segment)."""
        view = _slice(region, off, length)
        if view is None:
            return self._gone(sock, op, tag, region, length)
        if op == WRITE:
            e = recv_into_segment(sock, region.segment, view, off, length)
            if e is not None:
                self.mark_damaged(region, e)
                self._reply(sock, DAMAGED, tag, region.damaged)
            else:
                self._reply(sock, OK, tag)
            return True
        sock.sendall(RESP.pack(OK, tag, length))
        e = send_from_segment(sock, region.segment, view, off, length)
        if e is not None:                 # shrunk during the copy: the reply is cut short, the channel closes
            self.mark_damaged(region, e)
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
            self._reply(sock, _status_of(e), tag, e.message)
        return True

    def close(self) -> None:
        self._closing = True
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)    # wakes a blocked accept(): close alone leaves it accepting one
        except OSError:
            pass
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass




def _status_of(e: TransportError) -> int:
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
