"""A mesh buffer that rides through a recovery of its connection (`mesh_open(conn, side=..., reconnect=True)`).

When an agent of a mesh connection restarts, the control plane marks the connection RECOVERING and, once the
agents re-registered their buffers over the surviving memory, READY again with the same id and secret but
possibly new descriptors (a new data-plane endpoint and TLS fingerprint; for verbs new rkeys and queue pairs;
docs/mesh.md "What survives what"). A plain `mesh_open` connection then fails with `PeerGone`.
`ReconnectingConnection` wraps one (composition: the data-plane connection is `current`) and on such a failure
polls the connection (`get(id)`, e.g. `MeshClient.mesh_get`) with backoff until it is READY, opens it again
with the new descriptors, and retries the operation once.

What is retried:

* `write` / `read`: one-sided, idempotent (the same bytes at the same offset): retried once after the reopen.
* `recv`: retried; it cannot duplicate a message. A message the data plane handed out just as the channel
  broke, and the messages queued in an inbox when its agent died (inboxes are the agent's memory, not the
  segment's), are lost: two-sided messages are not durable across an agent restart.
* `send`: retried only when nothing of it left this process (the channel had to be opened and was not
  there, or the data plane refused it with a definite answer: revoked, not authorized). When the channel
  broke while the message was on its way, nobody can say whether the data plane queued it: the send raises
  `MeshSendUnconfirmed` instead of sending it twice; the next operation waits for the recovery as usual.
* Posted operations (`current.post_write` / `post_read` / `flush`) are not retried.

For verbs the queue pairs die with either agent and only a recovery makes new ones: the buffer waits for a READY
record with new descriptors (a `QueuePairError` waits too), not merely for READY.

The wrapper gives up with a `mesh.errors.MeshConnectionLost` naming the connection: `MeshConnectionFailed`
(the connection turned FAILED; its message says why), `MeshConnectionClosed` (disconnected: NOT_FOUND),
`MeshRecoveryTimeout` (not usable again within `recover_timeout` seconds). Errors that say nothing about
a recovery (`OutOfBounds`, `Unsupported`, ...) are raised as they are.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from gpumesh.v1 import mesh_service_pb2 as M
from mesh import errors
from mesh.transport.base import (InvalidKey, NotAuthorized, PeerGone, QueuePairError, Revoked, TransportError)

READY, FAILED = M.MESH_CONNECTION_STATE_READY, M.MESH_CONNECTION_STATE_FAILED
# Answers of a data plane that may mean "this connection is being (or was) recovered": checked with `get`.
MAYBE_RECOVERING = (Revoked, NotAuthorized, InvalidKey, QueuePairError)
FIRST_DELAY_S, MAX_DELAY_S = 0.05, 2.0
# What `get` may answer while the control plane itself is away (restarting, failing over): keep polling. Any
# other error (a permission withdrawn, a token expired) is the caller's to see at once.
AWAY = (errors.Unavailable, errors.DeadlineExceeded)


def _state_name(value: int) -> str:
    from mesh.meshapi import connection_state_name
    return connection_state_name(value)


class ReconnectingConnection:
    """`side` ("a" or "b") of mesh connection `conn`, reopened after a recovery of the connection.

    `get(id)` returns the connection's current record (`MeshClient.mesh_get`; it raises `mesh.errors.NotFound`
    once the connection is gone). `open(conn, side, secret)` opens a data-plane connection (default: what
    `mesh_open` does). `reopens` counts the reopens after a recovery; `connection` is the record last opened;
    `waiting_since` is the monotonic time the current wait for a recovery began (None when not waiting).
    One operation at a time (as the transports' connections)."""

    def __init__(self, conn: M.MeshConnection, side: str, *, get: Callable[[str], M.MeshConnection],
                 open: Callable[[M.MeshConnection, str, bytes], Any] | None = None, recover_timeout: float = 60.0,
                 fallback: bool = True, secret: bytes = b"", sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if side not in ("a", "b"):
            raise ValueError(f"side: {side!r} is not 'a' or 'b' (the buffer of the connection to open)")
        if not recover_timeout > 0:
            raise ValueError(f"recover_timeout: {recover_timeout!r} is not a positive number of seconds")
        if not conn.id:
            raise ValueError("conn: a MeshConnection with an id (from mesh_connect or mesh_get) is needed")
        self.id, self.side, self.recover_timeout = conn.id, side, float(recover_timeout)
        self.connection = conn
        self.reopens = 0
        self.waiting_since: float | None = None
        # the caller's secret, else the record's (Get returns it empty to a caller who does not need it); it never changes
        self._secret = secret or conn.secret
        self._get, self._sleep, self._clock = get, sleep, clock
        self._open_fn = open or (lambda c, s, secret: _default_open(c, s, secret, fallback))
        self._lock = threading.RLock()
        self._closed = False
        self._conn = None
        self._ensure("open")              # opened while its agent is away: it waits for the recovery like any operation

    # -- the Connection interface -----------------------------------------------------------

    @property
    def descriptor(self):
        return self.current.descriptor

    @property
    def current(self):
        """The data-plane connection in use now (changes at a reopen)."""
        with self._lock:
            return self._ensure("use")

    def write(self, offset: int, data) -> int:
        return self._run("write", lambda c: c.write(offset, data))

    def read(self, offset: int, length: int, into=None):
        return self._run("read", lambda c: c.read(offset, length, into))

    def recv(self, timeout: float = 0.0) -> bytes | None:
        return self._run("recv", lambda c: c.recv(timeout))

    def send(self, data) -> int:
        return self._run("send", lambda c: c.send(data), unsure_if_cut=True)

    def close(self) -> None:
        self._closed = True               # first, without the lock: a wait for a recovery in another thread ends
        with self._lock:
            self._drop()

    def __enter__(self) -> "ReconnectingConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recovery ---------------------------------------------------------------------------

    def _run(self, op: str, fn, unsure_if_cut: bool = False):
        with self._lock:
            conn = self._ensure(op)           # nothing of the operation has left this process before this
            try:
                return fn(conn)
            except TransportError as e:
                cause = self._failed(op, e, unsure_if_cut)
            self._conn = self._recover(op, cause)
            try:
                return fn(self._conn)         # the one retry
            except TransportError as e:
                self._failed(op, e, unsure_if_cut)     # the next operation reopens (it waits again if need be)
                raise

    def _failed(self, op: str, e: TransportError, unsure_if_cut: bool) -> TransportError:
        """After a failed operation: raise it when it says nothing about a recovery (or the connection is gone),
        drop the data-plane connection, raise MeshSendUnconfirmed for a send cut on its way; else `e`."""
        if not self._worth_recovering(e):
            raise e
        self._drop()
        if unsure_if_cut and isinstance(e, PeerGone) and e.op != "connect":     # (a channel not opened: nothing left)
            raise errors.MeshSendUnconfirmed(
                f"{op} on mesh connection {self.id} (side {self.side}): the channel broke while the message was on "
                f"its way ({e}); it may or may not have been queued, so it is not sent again. The next operation "
                f"waits for the connection's recovery", connection_id=self.id, state="unknown") from e
        return e

    def _ensure(self, op: str):
        if self._closed:
            raise TransportError(f"{op} on mesh connection {self.id} (side {self.side}): closed", op=op)
        if self._conn is None:
            try:
                self._conn = self._open(self.connection)
            except TransportError as e:
                if not self._worth_recovering(e):
                    raise
                self._conn = self._recover(op, e)
        return self._conn

    def _worth_recovering(self, e: TransportError) -> bool:
        """PeerGone always; a refusal that may come from a recovery only when the connection says so (it is not
        READY, or READY with other descriptors than the ones opened); disconnected/FAILED raise here."""
        if isinstance(e, PeerGone):
            return True
        if not isinstance(e, MAYBE_RECOVERING):
            return False
        try:
            now = self._fetch("check", e)
        except errors.MeshConnectionClosed:
            raise
        except AWAY:                       # the control plane is away: wait for it (and the recovery) as usual
            return True
        self._give_up_if_over(now, "check", e)
        if isinstance(e, QueuePairError) and self._rdma:
            return True                    # only a recovery (new queue pairs) makes it usable again
        return now.state != READY or self._changed(now)

    def _fetch(self, op: str, cause: BaseException) -> M.MeshConnection:
        try:
            return self._get(self.id)
        except errors.NotFound:
            raise errors.MeshConnectionClosed(
                f"mesh connection {self.id} was disconnected (NOT_FOUND); {op} on side {self.side} failed: {cause}",
                connection_id=self.id, state="NOT_FOUND") from cause

    def _give_up_if_over(self, now: M.MeshConnection, op: str, cause: BaseException) -> None:
        if now.state == FAILED:
            raise errors.MeshConnectionFailed(
                f"mesh connection {self.id} FAILED: {now.message or '(no message)'}; disconnect it and connect "
                f"again ({op} on side {self.side} failed: {cause})", connection_id=self.id, state="FAILED",
                reason=now.message) from cause

    def _recover(self, op: str, cause: TransportError):
        """Wait (polling `get` with backoff) until the connection is READY and opens; the new connection."""
        self.waiting_since = start = self._clock()
        deadline, delay, last, state = start + self.recover_timeout, FIRST_DELAY_S, cause, "?"
        try:
            while True:
                if self._closed:
                    raise TransportError(f"{op} on mesh connection {self.id} (side {self.side}): closed while "
                                         f"waiting for its recovery", op=op)
                try:
                    now = self._fetch(op, last)
                except errors.MeshConnectionClosed:
                    raise
                except AWAY as e:                     # the control plane is away (restarting): keep polling
                    last, now = e, None
                if now is not None:
                    self._give_up_if_over(now, op, last)
                    state = _state_name(now.state)
                    if now.state == READY and self._rdma and not self._changed(now):
                        state += " with the queue pairs that failed"     # the peer's agent is not back yet
                    elif now.state == READY:
                        try:
                            conn = self._open(now)
                        except (PeerGone, *MAYBE_RECOVERING) as e:    # not up yet (its agent, its new keys)
                            last = e
                        else:
                            self.connection, self.reopens = now, self.reopens + 1
                            return conn
                    elif now.message:
                        state += f": {now.message}"
                left = deadline - self._clock()
                if left <= 0:
                    raise errors.MeshRecoveryTimeout(
                        f"mesh connection {self.id} (side {self.side}) is not usable again after "
                        f"{self.recover_timeout:g} s ({op} failed: {cause}); its state: {state}; last error: {last}",
                        connection_id=self.id, state=state.split(":")[0]) from cause
                self._sleep(min(delay, left))
                delay = min(delay * 2, MAX_DELAY_S)
        finally:
            self.waiting_since = None

    @property
    def _rdma(self) -> bool:
        # A queue pair that failed (its peer's agent died) is replaced only by a recovery, which makes new ones on
        # both sides: a READY record with the old descriptors is the state before the control plane noticed.
        return self.connection.transport == "verbs"

    def _changed(self, now: M.MeshConnection) -> bool:
        return (now.a, now.b) != (self.connection.a, self.connection.b)

    def _open(self, conn: M.MeshConnection):
        return self._open_fn(conn, self.side, conn.secret or self._secret)

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except (OSError, TransportError):
                pass
            self._conn = None


def _default_open(conn: M.MeshConnection, side: str, secret: bytes, fallback: bool):
    from mesh.meshapi import open_connection
    return open_connection(conn, fallback, side=side, secret=secret)
