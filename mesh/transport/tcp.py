"""TCP: the one-sided semantics of RDMA for hosts without it.

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
import logging
import secrets
import socket
import struct
import threading
from dataclasses import dataclass, field

from mesh.transport.base import (BufferDescriptor, Completion, InvalidKey, OutOfBounds, PeerGone, Revoked, TransportError,
                                 new_key)

logger = logging.getLogger(__name__)

REQ = struct.Struct("<BBHIQQQ")
RESP = struct.Struct("<BxxxIQ")
WRITE, READ, SEND, RECV, PING = 1, 2, 3, 4, 5
OPS = {WRITE: "write", READ: "read", SEND: "send", RECV: "recv", PING: "ping"}
OK, INVALID_KEY, OUT_OF_BOUNDS, REVOKED, BAD_REQUEST, EMPTY, QUEUE_FULL = range(7)
SOCK_BUF = 8 << 20
DRAIN_LIMIT = 1 << 30          # a refused WRITE larger than this closes the connection instead
MAX_MESSAGE = 16 << 20
MAX_QUEUED = 1024
REVOKED_KEPT = 100_000
WINDOW = 64                    # posted operations in flight per connection


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k


@dataclass
class Region:
    buffer_id: str
    slice_id: str
    rkey: int
    base: int
    data: memoryview
    inbox: collections.deque = field(default_factory=collections.deque)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def length(self) -> int:
        return self.data.nbytes


class TcpDataPlane:
    """The agent's data-plane server: one thread per peer connection."""

    def __init__(self, listen_host: str = "0.0.0.0", port: int = 0, advertise_host: str = "127.0.0.1") -> None:
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

    def add(self, buffer_id: str, slice_id: str, data, rkey: int = 0, base: int = 0) -> Region:
        """Serve `data` (a writable bytes-like) under a key; the region (with its base address:
        `base`, e.g. a verbs MR's address, or a random one)."""
        mv = memoryview(data).cast("B")
        if mv.readonly:
            raise TransportError(f"buffer {buffer_id} is read-only", op="register", buffer_id=buffer_id)
        base = base or (secrets.randbits(32) + 1) << 16
        region = Region(buffer_id, slice_id, rkey or new_key(), base, mv)
        with self._lock:
            self.regions[region.rkey] = region
        return region

    def remove(self, rkey: int) -> None:
        """Revoke a key: later requests with it answer REVOKED; waiting receivers wake up."""
        with self._lock:
            region = self.regions.pop(rkey, None)
            if region is None:
                return
            self.revoked[rkey] = region.buffer_id
            while len(self.revoked) > REVOKED_KEPT:
                self.revoked.popitem(last=False)
        with region.cond:
            region.inbox.clear()
            region.cond.notify_all()
        try:
            region.data.release()     # in-flight operations keep their own slices of it
        except BufferError:
            pass

    # -- serving ------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._lsock.accept()
            except OSError:
                return
            tune(sock)
            with self._lock:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="mesh-dataplane-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        hdr = bytearray(REQ.size)
        hv = memoryview(hdr)
        try:
            while True:
                try:
                    recv_exact(sock, hv)
                except (ConnectionError, OSError):
                    return
                op, _, _, tag, rkey, addr, length = REQ.unpack(hdr)
                if not self._handle(sock, op, tag, rkey, addr, length):
                    return
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

    def _lookup(self, rkey: int) -> tuple[Region | None, int, str]:
        region = self.regions.get(rkey)
        if region is not None:
            return region, OK, ""
        if rkey in self.revoked:
            return None, REVOKED, f"buffer {self.revoked[rkey]} was deregistered"
        return None, INVALID_KEY, "no region has this key"

    def _reply(self, sock: socket.socket, status: int, tag: int, payload=b"") -> None:
        payload = payload.encode() if isinstance(payload, str) else payload
        n = memoryview(payload).nbytes
        if n <= 65536:
            sock.sendall(RESP.pack(status, tag, n) + bytes(payload))
        else:
            sock.sendall(RESP.pack(status, tag, n))
            sock.sendall(payload)

    def _drain(self, sock: socket.socket, length: int) -> bool:
        if length > DRAIN_LIMIT:
            return False
        scratch = memoryview(bytearray(min(length, 1 << 20)))
        while length:
            k = min(length, scratch.nbytes)
            recv_exact(sock, scratch[:k])
            length -= k
        return True

    def _handle(self, sock: socket.socket, op: int, tag: int, rkey: int, addr: int, length: int) -> bool:
        if op == PING:
            self._reply(sock, OK, tag)
            return True
        if op not in OPS:
            self._reply(sock, BAD_REQUEST, tag, f"unknown op {op}")
            return False
        region, status, why = self._lookup(rkey)
        carries = op in (WRITE, SEND)
        if region is not None and op in (WRITE, READ):
            off = addr - region.base
            if addr < region.base or off + length > region.length:
                status, why = OUT_OF_BOUNDS, (f"{OPS[op]} of {length} bytes at offset {off} is outside buffer "
                                              f"{region.buffer_id} of {region.length} bytes")
        elif region is not None and op == SEND and length > MAX_MESSAGE:
            status, why = BAD_REQUEST, f"message of {length} bytes is over the {MAX_MESSAGE}-byte limit"
        if status != OK:
            if carries and not self._drain(sock, length):
                self._reply(sock, status, tag, why)
                return False
            self._reply(sock, status, tag, why)
            return True
        if op == WRITE:
            off = addr - region.base
            recv_exact(sock, region.data[off:off + length])
            self._reply(sock, OK, tag)
        elif op == READ:
            off = addr - region.base
            sock.sendall(RESP.pack(OK, tag, length))
            sock.sendall(region.data[off:off + length])
        elif op == SEND:
            msg = bytearray(length)
            recv_exact(sock, memoryview(msg))
            with region.cond:
                if len(region.inbox) >= MAX_QUEUED:
                    self._reply(sock, QUEUE_FULL, tag, f"buffer {region.buffer_id}'s inbox is full")
                    return True
                region.inbox.append(bytes(msg))
                region.cond.notify()
            self._reply(sock, OK, tag)
        elif op == RECV:
            timeout = addr / 1000.0
            with region.cond:
                region.cond.wait_for(lambda: region.inbox or rkey not in self.regions, timeout)
                msg = region.inbox.popleft() if region.inbox else None
            if msg is None:
                gone = rkey not in self.regions
                self._reply(sock, REVOKED if gone else EMPTY, tag, f"buffer {region.buffer_id} was deregistered"
                            if gone else "")
            else:
                self._reply(sock, OK, tag, msg)
        return True

    def close(self) -> None:
        self._closing = True
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


class TcpConnection:
    """A peer's connection to one remote region (thread-safe: one request at a time)."""

    def __init__(self, descriptor: BufferDescriptor, timeout: float = 30.0) -> None:
        self.descriptor = descriptor
        host, _, port = descriptor.endpoint.rpartition(":")
        self._where = descriptor.endpoint
        try:
            self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise PeerGone(f"cannot reach the data plane of buffer {descriptor.buffer_id} at {self._where}: {e}",
                           op="connect", buffer_id=descriptor.buffer_id, endpoint=self._where) from None
        tune(self._sock)
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
        hdr = REQ.pack(op, 0, 0, self._tag, self.descriptor.rkey, addr, length)
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
                out.append(Completion(wr_id, name, length if op == WRITE else n_body))
            else:
                out.append(Completion(wr_id, name, 0, self._error(name, status, body.decode(errors="replace"),
                                                                  offset, length)))
        return out

    def post_write(self, offset: int, data, wr_id: int = 0) -> int:
        """Start a one-sided write; its completion comes from `poll()`. Returns the work request id."""
        mv = memoryview(data).cast("B")
        with self._lock:
            return self._post(WRITE, self.descriptor.address + offset, mv.nbytes, payload=mv, offset=offset,
                              wr_id=wr_id)

    def post_read(self, offset: int, length: int, into, wr_id: int = 0) -> int:
        """Start a one-sided read into the writable buffer `into`; completes through `poll()`."""
        with self._lock:
            return self._post(READ, self.descriptor.address + offset, length, into=into, offset=offset, wr_id=wr_id)

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
            hdr = REQ.pack(op, 0, 0, self._tag, self.descriptor.rkey, addr, length)
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
        self._call(WRITE, self.descriptor.address + offset, mv.nbytes, payload=mv, offset=offset)
        return mv.nbytes

    def read(self, offset: int, length: int, into=None):
        if into is not None and memoryview(into).nbytes < length:
            raise ValueError(f"read of {length} bytes into a buffer of {memoryview(into).nbytes}")
        n, body = self._call(READ, self.descriptor.address + offset, length, into=into, offset=offset)
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


class TcpTransport:
    """Registers host buffers on a data plane (its own unless one is given) and connects to peers'."""

    name = "tcp"

    def __init__(self, node: str = "", server: TcpDataPlane | None = None) -> None:
        self.node = node
        self._own = server is None
        self.server = server or TcpDataPlane("127.0.0.1", 0, "127.0.0.1")
        self.buffers: dict[str, Region] = {}

    def register(self, slice_id: str, size: int = 0, buffer=None, buffer_id: str = "",
                 rkey: int = 0) -> BufferDescriptor:
        bid = buffer_id or f"b-{secrets.token_hex(6)}"
        data = buffer if buffer is not None else bytearray(size)
        region = self.server.add(bid, slice_id, data, rkey)
        self.buffers[bid] = region
        return BufferDescriptor(buffer_id=bid, slice_id=slice_id, node=self.node, transport="tcp",
                                address=region.base, length=region.length, rkey=region.rkey,
                                endpoint=self.server.endpoint)

    def view(self, buffer_id: str) -> memoryview:
        return self.buffers[buffer_id].data

    def deregister(self, buffer_id: str) -> None:
        region = self.buffers.pop(buffer_id, None)
        if region is not None:
            self.server.remove(region.rkey)

    def connect(self, descriptor: BufferDescriptor) -> TcpConnection:
        return TcpConnection(descriptor)

    def close(self) -> None:
        for bid in list(self.buffers):
            self.deregister(bid)
        if self._own:
            self.server.close()
