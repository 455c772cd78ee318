"""The agent's TCP data-plane server: serves registered regions, checks keys and bounds.

See `mesh.transport.tcp` for the framing. One thread per peer connection; payloads
go straight between the socket and the region (`recv_into` / `sendall` of slices).
"""

from __future__ import annotations

import collections
import secrets
import socket
import threading
from dataclasses import dataclass, field

from mesh.transport.base import TransportError, new_key
from mesh.transport.wire import (BAD_REQUEST, DRAIN_LIMIT, EMPTY, INVALID_KEY, MAX_MESSAGE, MAX_QUEUED, OK, OPS,
                                 OUT_OF_BOUNDS, PING, QUEUE_FULL, READ, RECV, REQ, RESP, REVOKED, REVOKED_KEPT,
                                 SEND, WRITE, recv_exact, tune)


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


