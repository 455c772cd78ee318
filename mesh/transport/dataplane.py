"""The agent's TCP data-plane server: accepts peer connections and serves each on its own thread.

See `mesh.transport.tcp` for the framing and `mesh.transport.channel` for the
handshake every channel starts with (TLS across hosts, the per-connection
secret). One thread per peer connection, at most MAX_CONNECTIONS (a connection
past them is closed at once, and running out of descriptors only pauses
accepting). The served regions live in `mesh.transport.regions` (`plane.regions`:
add, remove, mark damaged); each request on a connection is answered by
`mesh.transport.handler` (bounds, inboxes, RDMA, tenant segments).

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

import errno
import logging
import socket
import threading
import time

from prometheus_client import Counter

from mesh.logs import log
from mesh.transport import channel
from mesh.transport.handler import RequestHandler
from mesh.transport.regions import RegionTable
from mesh.transport.wire import REQ, recv_exact, tune

logger = logging.getLogger(__name__)
CONNECTIONS_DROPPED = Counter("gpumesh_mesh_dataplane_connections_dropped_total", "Data-plane connections closed "
                              "at once because MAX_CONNECTIONS were open (reason: limit)", ["reason"])

MAX_CONNECTIONS = 1024          # open peer connections (one thread each); the next is closed at once
ACCEPT_RETRY_S = 0.1            # pause after accept() ran out of descriptors or memory, before trying again
ACCEPT_LOG_EVERY_S = 10.0       # at most one log line per this many seconds for those (and for dropped ones)
# accept() errors a connection flood causes (or a peer resetting before it was accepted): they pass, so
# the data plane goes on accepting; any other error (EINVAL/EBADF: close() shut the listener) ends it
ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED})


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
        self.identity, self.require_tls_remote = identity, require_tls_remote
        self.refuse_unscoped = refuse_unscoped
        self.regions = RegionTable(on_damaged)
        self.requests = RequestHandler(self.regions, rdma)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._lsock = socket.create_server((listen_host, port), backlog=128, reuse_port=False)
        self.port = self._lsock.getsockname()[1]
        self.endpoint = f"{advertise_host}:{self.port}"
        self._lock = threading.Lock()
        self._closing = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="mesh-dataplane", daemon=True)
        self._thread.start()

    @property
    def tls_sha256(self) -> bytes:
        return self.identity.sha256 if self.identity is not None else b""

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
                                       secret_of=self.regions.secret_of, allow_unscoped=not self.refuse_unscoped)
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
                    if not self.requests.handle(sock, op, tag, rkey, addr, length, scope, remote):
                        return
                except (ConnectionError, OSError):
                    return
        finally:
            with self._lock:
                self._conns.discard(sock)
            sock.close()

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
