"""Byte relays between a workload without network (`gpumesh.io/network=none`) and the agent's transfers.

Such a workload has only its own loopback, yet the cooperative SDK moves its state over the transfer
protocol (mesh/checkpoint/transfer*.py): out to the agent's receiver (checkpoint) or to a target on
another node (live migration), and in from a stored checkpoint or a source (restore, migration target).
A pathname Unix socket crosses network namespaces, so the agent carries these streams through sockets in
the workload's own directory (its /tmp inside):

- `outbound(workdir, uid, gid, target)`: the agent listens on `<workdir>/.gpumesh-relay/<name>.sock`
  (a directory the agent owns, so the tenant cannot swap the socket; the socket is the tenant's, 0600)
  and pipes each connection to `target` (HOST:PORT). The workload dials `unix:/tmp/.gpumesh-relay/...`.
- `inbound(listen_host, workdir, name, uid)`: the agent listens on `listen_host:0` and pipes each
  connection to the Unix socket the workload listens on (`<workdir>/<name>`); the socket must be a
  socket (never a link) owned by the tenant, and its listener must run as the tenant's uid
  (SO_PEERCRED), so a tenant cannot point the agent at another service's socket.

The bytes relayed are the transfer protocol's own: authenticated and sealed with the session's secret
(mesh/checkpoint/transfer_auth.py); a relay adds no trust. Each relay is threads (an accept loop, two
pumps per connection) and ends with `stop()`, which also unlinks an outbound relay's socket (through the
agent's directory's descriptor, never a path the tenant could redirect).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from mesh import ownedsock
from mesh.logs import log

logger = logging.getLogger(__name__)
RELAY_DIR = ".gpumesh-relay"
INSIDE_RELAY_DIR = "/tmp/" + RELAY_DIR
RECEIVE_SOCKET = ".gpumesh-receive.sock"        # a receiving target's listener, in its own directory
CHUNK = 1 << 20


class RelayError(OSError):
    """A relay cannot be set up (or the workload's socket is not the workload's)."""


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Relay:
    """Accepts on `listener` and pipes each connection to a fresh `dial()`."""

    def __init__(self, listener: socket.socket, dial: Callable[[], socket.socket], address: str, name: str) -> None:
        self.listener, self._dial, self.address, self.name = listener, dial, address, name
        self.host_path = ""
        self.on_stop: Callable[[], None] | None = None     # outbound: unlinks its socket
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        listener.settimeout(0.5)
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"relay-{name}")

    def start(self) -> "Relay":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            try:
                peer = self._dial()
            except OSError as e:
                log(logger, logging.WARNING, "transfer relay: cannot reach the other end", relay=self.name,
                    error=str(e))
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, peer]
            for a, b in ((conn, peer), (peer, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True, name=f"relay-{self.name}").start()

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if self.on_stop is not None:
            self.on_stop()
            self.on_stop = None


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _relay_dir(workdir: str) -> int:
    """An O_PATH descriptor of `<workdir>/.gpumesh-relay`, made here, owned by the agent and not writable
    by the tenant (who owns `workdir` and could otherwise replace the socket with a link)."""
    wfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            os.mkdir(RELAY_DIR, 0o711, dir_fd=wfd)
        except FileExistsError:
            pass
        dfd = os.open(RELAY_DIR, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=wfd)
    finally:
        os.close(wfd)
    st = os.fstat(dfd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(dfd)
        raise RelayError(f"{os.path.join(workdir, RELAY_DIR)} is not the agent's (owner {st.st_uid}, mode "
                         f"{oct(st.st_mode & 0o7777)}): the workload made it")
    os.chmod(f"/proc/self/fd/{dfd}", 0o711)
    return dfd


def _unlink_socket(workdir: str, name: str) -> None:
    """Remove the relay's socket `name` from `<workdir>/.gpumesh-relay`, reached by descriptors without
    following a link, and only while that directory is still the agent's."""
    try:
        wfd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            dfd = os.open(RELAY_DIR, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=wfd)
        finally:
            os.close(wfd)
        try:
            st = os.fstat(dfd)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)
    except OSError as e:          # the workload's directory already gone with it: nothing left to remove
        log(logger, logging.DEBUG, "transfer relay: socket not removed", workdir=workdir, name=name, error=str(e))


def outbound(workdir: str, uid: int, gid: int, target: str) -> Relay:
    """A Unix socket in the workload's directory that leads to `target` (HOST:PORT); `.address` is its
    name inside the workload (`unix:/tmp/.gpumesh-relay/<name>.sock`)."""
    name = f"out-{uuid.uuid4().hex[:12]}.sock"
    dfd = _relay_dir(workdir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"/proc/self/fd/{dfd}/{name}")       # the directory's name may be too long for sun_path
        os.chown(f"/proc/self/fd/{dfd}/{name}", uid, gid)
        os.chmod(f"/proc/self/fd/{dfd}/{name}", 0o600)
        sock.listen(16)
    except OSError:
        sock.close()
        _unlink_socket(workdir, name)
        raise
    finally:
        os.close(dfd)
    host, port = _split(target)
    relay = Relay(sock, lambda: socket.create_connection((host, port), timeout=30),
                  f"unix:{INSIDE_RELAY_DIR}/{name}", f"out-{name}")
    relay.host_path = os.path.join(workdir, RELAY_DIR, name)      # the same socket, as the host sees it
    relay.on_stop = lambda: _unlink_socket(workdir, name)
    return relay.start()


def _dial_workload(workdir: str, name: str, uid: int) -> socket.socket:
    """Connect to the socket the workload listens on, `<workdir>/<name>`: a socket owned by `uid` (not a
    link to something else), whose listener runs as `uid` (mesh/ownedsock.py)."""
    try:
        s = ownedsock.dial(workdir, name, uid, timeout=30)
    except ownedsock.NotOwned as e:
        raise RelayError(str(e)) from e
    s.settimeout(None)                                # the pumps block; the relay's stop() shuts them down
    return s


def inbound(listen_host: str, workdir: str, name: str, uid: int) -> Relay:
    """A TCP port on `listen_host` that leads to the workload's Unix socket `<workdir>/<name>`; `.address`
    is HOST:PORT as bound (port picked by the kernel)."""
    family = socket.AF_INET6 if ":" in listen_host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((listen_host.strip("[]"), 0))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return Relay(sock, lambda: _dial_workload(workdir, name, uid), f"{listen_host}:{port}", f"in-{port}").start()
