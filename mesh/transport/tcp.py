"""TCP: the one-sided semantics of RDMA for hosts without it.

Every channel first runs the handshake of `mesh.transport.channel` (TLS across
hosts, the connection's secret); then the requests below.

The agent runs a `TcpDataPlane` on a port it reports; it serves the regions
registered on it. A peer's `TcpConnection` addresses a region as RDMA does:
remote address (the descriptor's `address` + offset) and rkey. The server
checks the key and the bounds of every request before it touches memory; a
refused WRITE's payload is read and dropped, so the stream stays in step and
nothing lands outside the region. Deregistered keys answer REVOKED.

Framing (little-endian): a request is a 32-byte header `op u8, flags u8,
reserved u16, tag u32, rkey u64, addr u64, length u64` followed by `length`
payload bytes for WRITE and SEND. A response is a 16-byte header `status u8,
reserved 3, tag u32, length u64` followed by `length` bytes: the data of a
READ or RECV, or an error text. Payloads go straight between the socket and
the region (`recv_into` / `sendall` of memoryview slices): no copies in Python.
"""

from __future__ import annotations

import collections
import secrets
import socket
import ssl
import threading

from mesh.transport import channel
from mesh.transport.base import (BufferDamaged, BufferDescriptor, Completion, InvalidKey, NotAuthorized, OutOfBounds,
                                 PeerGone, QueuePairError, Revoked, TransportError)
from mesh.transport.dataplane import TcpDataPlane
from mesh.transport.regions import Region
from mesh.transport.wire import (DAMAGED, EMPTY, INVALID_KEY, NOT_AUTHORIZED, OK, OPS, OUT_OF_BOUNDS, PEER_GONE, PING, QP_ERROR,
                                 RDMA_READ, RDMA_WRITE, READ, RECV, REQ, RESP, REVOKED, SEND, SOCK_BUF, WINDOW, WRITE,
                                 recv_exact, tune)

__all__ = ["TcpConnection", "RdmaConnection", "TcpTransport", "TcpDataPlane", "Region", "REQ", "RESP", "WRITE", "READ", "SEND",
           "RECV", "SOCK_BUF", "recv_exact", "tune"]

class TcpConnection:
    """A peer's connection to one remote region (thread-safe: one request at a time).

    `secret`: the connection's secret (from MeshService.Connect); the channel authenticates with it
    (see `mesh.transport.channel`), over TLS when the data plane is on another host and names a
    certificate (`descriptor.tls_sha256`). `force_tls` uses TLS on one host too (benchmarks)."""

    OP_WRITE, OP_READ = WRITE, READ

    def __init__(self, descriptor: BufferDescriptor, timeout: float = 30.0, *, secret: bytes = b"",
                 force_tls: bool = False, via: BufferDescriptor | None = None) -> None:
        self.descriptor = descriptor
        self._auth = via or descriptor            # the buffer the channel authenticates for, and its agent
        self._key = descriptor.rkey
        self._base = descriptor.address
        host, _, port = self._auth.endpoint.rpartition(":")
        self._where = self._auth.endpoint
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise PeerGone(f"cannot reach the data plane of buffer {self._auth.buffer_id} at {self._where}: {e}",
                           op="connect", buffer_id=descriptor.buffer_id, endpoint=self._where) from None
        tune(sock)
        try:
            self._sock = channel.client_open(sock, buffer_id=self._auth.buffer_id, secret=secret,
                                             tls_sha256=self._auth.tls_sha256, force_tls=force_tls)
        except (OSError, ConnectionError, ssl.SSLError) as e:
            sock.close()
            raise PeerGone(f"handshake with the data plane at {self._where} failed: {e}", op="connect",
                           buffer_id=descriptor.buffer_id, endpoint=self._where) from None
        self.tls = isinstance(self._sock, ssl.SSLSocket)
        self._lock = threading.Lock()
        self._tag = 0
        self._resp = bytearray(RESP.size)
        self._pending: collections.deque = collections.deque()
        self._done: list[Completion] = []

    def _fail(self, op: str, e: BaseException) -> PeerGone:
        self._close_sock()
        return PeerGone(f"{op} on buffer {self.descriptor.buffer_id}: the peer at {self._where} went away ({e})",
                        op=op, buffer_id=self.descriptor.buffer_id, endpoint=self._where)

    def _error(self, op: str, status: int, text: str, offset: int = 0, length: int = 0) -> TransportError:
        bid = self.descriptor.buffer_id
        if status == INVALID_KEY:
            return InvalidKey(f"{op} on buffer {bid}: {text}", op=op, buffer_id=bid, rkey=self.descriptor.rkey)
        if status == OUT_OF_BOUNDS:
            return OutOfBounds(text, op=op, buffer_id=bid, offset=offset, length=length,
                               region_length=self.descriptor.length)
        if status == REVOKED:
            return Revoked(f"{op} on buffer {bid}: {text}", op=op, buffer_id=bid)
        if status == PEER_GONE:
            return PeerGone(f"{op} on buffer {bid}: {text}", op=op, buffer_id=bid, endpoint=self.descriptor.node)
        if status == QP_ERROR:
            return QueuePairError(f"{op} on buffer {bid}: {text}", op=op, buffer_id=bid)
        if status == NOT_AUTHORIZED:
            return NotAuthorized(f"{op} on buffer {bid}: {text}", op=op, buffer_id=bid)
        if status == DAMAGED:
            return BufferDamaged(text, op=op, buffer_id=bid, reason="shrunk")
        return TransportError(f"{op} on buffer {bid}: {text or 'status ' + str(status)}", op=op, buffer_id=bid)

    # -- posted operations: a window of requests in flight, completions in order --------------

    def _post(self, op: int, addr: int, length: int, payload=None, into=None, offset: int = 0,
              wr_id: int = 0) -> int:
        name = OPS[op]
        if self._sock is None:
            raise PeerGone(f"{name} on buffer {self.descriptor.buffer_id}: connection closed", op=name,
                           buffer_id=self.descriptor.buffer_id, endpoint=self._where)
        if len(self._pending) >= WINDOW:
            self._done.extend(self._reap(1))
        self._tag = (self._tag + 1) & 0xFFFFFFFF
        hdr = REQ.pack(op, 0, 0, self._tag, self._key, addr, length)
        try:
            if payload is not None and length <= 65536:
                self._sock.sendall(hdr + bytes(payload))
            else:
                self._sock.sendall(hdr)
                if payload is not None:
                    self._sock.sendall(payload)
        except OSError as e:
            raise self._fail(name, e) from None
        self._pending.append((wr_id or self._tag, op, into, offset, length))
        return wr_id or self._tag

    def _reap(self, n: int) -> list[Completion]:
        """Read the responses of the `n` oldest posted operations."""
        out = []
        rv = memoryview(self._resp)
        for _ in range(n):
            wr_id, op, into, offset, length = self._pending.popleft()
            name = OPS[op]
            try:
                recv_exact(self._sock, rv)
                status, _, n_body = RESP.unpack(self._resp)
                if status == OK and into is not None:
                    recv_exact(self._sock, memoryview(into).cast("B")[:n_body])
                    out.append(Completion(wr_id, name, n_body))
                    continue
                body = bytearray(n_body)
                if n_body:
                    recv_exact(self._sock, memoryview(body))
            except (OSError, ConnectionError, AttributeError) as e:
                self._pending.clear()
                raise self._fail(name, e) from None
            if status == OK:
                out.append(Completion(wr_id, name, length if op == self.OP_WRITE else n_body))
            else:
                out.append(Completion(wr_id, name, 0, self._error(name, status, body.decode(errors="replace"),
                                                                  offset, length)))
        return out

    def post_write(self, offset: int, data, wr_id: int = 0) -> int:
        """Start a one-sided write; its completion comes from `poll()`. Returns the work request id."""
        mv = memoryview(data).cast("B")
        with self._lock:
            return self._post(self.OP_WRITE, self._base + offset, mv.nbytes, payload=mv, offset=offset,
                              wr_id=wr_id)

    def post_read(self, offset: int, length: int, into, wr_id: int = 0) -> int:
        """Start a one-sided read into the writable buffer `into`; completes through `poll()`."""
        with self._lock:
            return self._post(self.OP_READ, self._base + offset, length, into=into, offset=offset, wr_id=wr_id)

    def poll(self, wait_all: bool = True) -> list[Completion]:
        """Completions of posted operations, oldest first (all outstanding ones with `wait_all`)."""
        with self._lock:
            done, self._done = self._done, []
            if wait_all and self._pending:
                done += self._reap(len(self._pending))
            return done

    def flush(self) -> int:
        """Wait for every posted operation; raise the first failure. The bytes moved."""
        done = self.poll()
        for c in done:
            if c.error is not None:
                raise c.error
        return sum(c.length for c in done)

    def _call(self, op: int, addr: int, length: int, payload=None, into=None, offset: int = 0):
        name = OPS[op]
        if self._sock is None:
            raise PeerGone(f"{name} on buffer {self.descriptor.buffer_id}: connection closed", op=name,
                           buffer_id=self.descriptor.buffer_id, endpoint=self._where)
        with self._lock:
            if self._pending:
                self._done.extend(self._reap(len(self._pending)))
            self._tag = (self._tag + 1) & 0xFFFFFFFF
            hdr = REQ.pack(op, 0, 0, self._tag, self._key, addr, length)
            try:
                if payload is not None and length <= 65536:
                    self._sock.sendall(hdr + bytes(payload))
                else:
                    self._sock.sendall(hdr)
                    if payload is not None:
                        self._sock.sendall(payload)
                rv = memoryview(self._resp)
                recv_exact(self._sock, rv)
                status, _, n = RESP.unpack(self._resp)
                if status == OK and into is not None:
                    recv_exact(self._sock, memoryview(into).cast("B")[:n])
                    return n, None
                body = bytearray(n)
                if n:
                    recv_exact(self._sock, memoryview(body))
            except (OSError, ConnectionError) as e:
                raise self._fail(name, e) from None
        if status == OK:
            return n, bytes(body)
        if status == EMPTY:
            return 0, None
        raise self._error(name, status, body.decode(errors="replace"), offset, length)

    def write(self, offset: int, data) -> int:
        mv = memoryview(data).cast("B")
        self._call(self.OP_WRITE, self._base + offset, mv.nbytes, payload=mv, offset=offset)
        return mv.nbytes

    def read(self, offset: int, length: int, into=None):
        if into is not None and memoryview(into).nbytes < length:
            raise ValueError(f"read of {length} bytes into a buffer of {memoryview(into).nbytes}")
        n, body = self._call(self.OP_READ, self._base + offset, length, into=into, offset=offset)
        return into if into is not None else body

    def send(self, data) -> int:
        mv = memoryview(data).cast("B")
        self._call(SEND, 0, mv.nbytes, payload=mv)
        return mv.nbytes

    def recv(self, timeout: float = 0.0) -> bytes | None:
        _, body = self._call(RECV, int(max(0.0, timeout) * 1000), 0)
        return body

    def ping(self) -> None:
        self._call(PING, 0, 0)

    def _close_sock(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        self._close_sock()

    def __enter__(self) -> "TcpConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RdmaConnection(TcpConnection):
    """A peer's buffer reached by RDMA: the caller's own agent (the owner of `local`, the caller's buffer
    of the same connection) posts RDMA WRITE/READ on the RC queue pair it keeps towards the peer's QP.
    Requests go to that agent over a same-host channel (authenticated with the connection's secret and
    `local`'s key); the bytes between the hosts move by RDMA, never over TCP. Two-sided messages go to
    the peer's data plane (`send`/`recv`)."""

    OP_WRITE, OP_READ = RDMA_WRITE, RDMA_READ

    def __init__(self, peer: BufferDescriptor, local: BufferDescriptor, timeout: float = 30.0, *,
                 secret: bytes = b"") -> None:
        super().__init__(peer, timeout, secret=secret, via=local)
        self._key, self._base = local.rkey, 0
        self._secret = secret
        self._msgs: TcpConnection | None = None

    def _error(self, op: str, status: int, text: str, offset: int = 0, length: int = 0) -> TransportError:
        if status == INVALID_KEY:     # a remote access error reported by the agent's completion
            return InvalidKey(f"{op} on buffer {self.descriptor.buffer_id}: {text}", op=op,
                              buffer_id=self.descriptor.buffer_id, rkey=self.descriptor.rkey)
        return super()._error(op, status, text, offset, length)

    def _peer_channel(self) -> TcpConnection:
        if self._msgs is None:
            self._msgs = TcpConnection(self.descriptor, secret=self._secret)
        return self._msgs

    def send(self, data) -> int:
        return self._peer_channel().send(data)

    def recv(self, timeout: float = 0.0) -> bytes | None:
        return self._peer_channel().recv(timeout)

    def close(self) -> None:
        super().close()
        if self._msgs is not None:
            self._msgs.close()


class TcpTransport:
    """Registers host buffers on a data plane (its own unless one is given) and connects to peers'."""

    name = "tcp"

    def __init__(self, node: str = "", server: TcpDataPlane | None = None) -> None:
        # Standalone (tests, benchmarks): buffers without a connection secret on a loopback plane.
        self.node = node
        self._own = server is None
        self.server = server or TcpDataPlane("127.0.0.1", 0, "127.0.0.1")
        self.buffers: dict[str, Region] = {}

    def register(self, slice_id: str, size: int = 0, buffer=None, buffer_id: str = "",
                 rkey: int = 0) -> BufferDescriptor:
        bid = buffer_id or f"b-{secrets.token_hex(6)}"
        data = buffer if buffer is not None else bytearray(size)
        region = self.server.regions.add(bid, slice_id, data, rkey)
        self.buffers[bid] = region
        return BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport="tcp",
                                address=region.base, length=region.length, rkey=region.rkey,
                                endpoint=self.server.endpoint, tls_sha256=self.server.tls_sha256)

    def view(self, buffer_id: str) -> memoryview:
        return self.buffers[buffer_id].data

    def deregister(self, buffer_id: str) -> None:
        region = self.buffers.pop(buffer_id, None)
        if region is not None:
            self.server.regions.remove(region.rkey)

    def connect(self, descriptor: BufferDescriptor) -> TcpConnection:
        return TcpConnection(descriptor)

    def close(self) -> None:
        for bid in list(self.buffers):
            self.deregister(bid)
        if self._own:
            self.server.close()
