"""The TCP data plane's wire format and socket helpers (see `mesh.transport.tcp`)."""

from __future__ import annotations

import socket
import struct

REQ = struct.Struct("<BBHIQQQ")
RESP = struct.Struct("<BxxxIQ")
WRITE, READ, SEND, RECV, PING, RDMA_WRITE, RDMA_READ = 1, 2, 3, 4, 5, 6, 7
OPS = {WRITE: "write", READ: "read", SEND: "send", RECV: "recv", PING: "ping", RDMA_WRITE: "write",
       RDMA_READ: "read"}
OK, INVALID_KEY, OUT_OF_BOUNDS, REVOKED, BAD_REQUEST, EMPTY, QUEUE_FULL, PEER_GONE, QP_ERROR, NOT_AUTHORIZED = range(10)
DAMAGED = 10                   # the buffer's segment was shrunk by a process that maps it (BufferDamaged)
SOCK_BUF = 8 << 20
DRAIN_LIMIT = 1 << 30          # a refused WRITE larger than this closes the connection instead
MAX_MESSAGE = 16 << 20
MAX_QUEUED = 1024
MAX_QUEUED_BYTES = 64 << 20     # a buffer's SEND inbox, in bytes: 1024 messages of MAX_MESSAGE would be 16 GiB
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


