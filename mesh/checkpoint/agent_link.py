"""The local control socket between the node agent (client) and a workload's SDK (server).

A Unix stream socket carrying JSON lines: the agent sends `{"cmd": NAME, ...args}`, the
SDK answers `{"ok": true, ...}` or `{"ok": false, "error": TYPE, "message": TEXT}`. One
connection carries any number of requests, one at a time; the SDK serves each
connection in its own thread, so `status` answers while a long `precopy_round` runs on
another connection.

Commands (served by `mesh.checkpoint.sdk.Checkpointer`):

| cmd | args | answer |
| --- | --- | --- |
| `status` | | step, paused, restored, receive_address, state_bytes, entries, pid |
| `pause` | timeout | blocks until the workload waits at a safe point; step |
| `resume` | | the workload continues (a restored target held by `GPUMESH_RESTORE_HOLD` starts) |
| `stop` | | the workload's `safe_point()` raises `WorkloadStopped` (exit 0) |
| `checkpoint` | path, or target+session+secret | full consistent checkpoint (pauses at a safe point if running) |
| `precopy_begin` | target, session, secret (hex), chunk_bytes | round 0: every tensor, while running |
| `precopy_round` | | the tensors changed since the last round |
| `dirty` | | how many entries/bytes changed since the last round (sends nothing) |
| `final` | | paused: the rest, the small data entries, and the commit |
| `precopy_abort` | | forget the pre-copy session |
| `wait_restored` | timeout | (target) blocks until a restore has been applied; the step it applied |
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from mesh import ownedsock
from mesh.checkpoint.format import CheckpointError

SOCKET_ENV = "GPUMESH_CHECKPOINT_SOCKET"
RESTORE_ENV = "GPUMESH_RESTORE_FROM"
HOLD_ENV = "GPUMESH_RESTORE_HOLD"
MAX_REPLY_BYTES = 1 << 20       # one reply line, newline included; replies are a few hundred bytes
DEFAULT_TIMEOUT = 600.0         # seconds; above PrecopyPolicy.pause_timeout (a `pause` blocks that long)


class CommandError(CheckpointError):
    """The workload refused or failed a command; `kind` is the SDK-side error type."""

    def __init__(self, command: str, kind: str, message: str) -> None:
        super().__init__(f"{command}: {kind}: {message}")
        self.command = command
        self.kind = kind


class ReplyTooLong(ConnectionError):
    """The workload sent more than MAX_REPLY_BYTES without ending its line: the link is closed, so a
    tenant's SDK cannot grow the agent's memory."""


class NoControlSocket(FileNotFoundError):
    """The workload has no control socket: it does not run the checkpoint SDK (or has not started it yet).
    Said in those words: the bare error named only '.gpumesh-ctl.sock', which tells an operator nothing."""

    def __init__(self, path: str) -> None:
        super().__init__(f"the workload has no checkpoint control socket ({path}): it does not use the "
                         f"mesh.checkpoint SDK, or has not started its Checkpointer yet; checkpoints and precopy or "
                         f"stop-and-copy migrations need it, a transparent migration (CRIU) does not "
                         f"(docs/checkpointing.md)")
        self.path = path


class AgentLink:
    """The agent's side: a connection to one workload's control socket.

    `uid`: the uid the workload runs as (the agent's own for a workload started unconfined). The socket must
    then be a socket owned by it, never a link, served by a process of that uid (mesh/ownedsock.py), else
    `ownedsock.NotOwned` and nothing is sent: the socket lies in the tenant's own directory, and a link there
    to another workload's socket would hand that workload this one's commands and checkpoint secret. None
    only for a socket the caller made itself (tests, benchmarks).

    `timeout`: seconds any one connect, send or reply may take (None: DEFAULT_TIMEOUT); a silent SDK never
    holds an agent thread forever. `reply_timeout`: seconds a reply may take instead (None: `timeout`), for a
    caller that bounds the wait itself by the command's progress and ends it with `abort` (a checkpoint's
    push: nodeagent/migrate_checkpoint.py `call_unless_stalled`)."""

    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT, uid: int | None = None,
                 reply_timeout: float | None = None) -> None:
        self.path = path
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.reply_timeout = self.timeout if reply_timeout is None else reply_timeout
        self.uid = uid
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> None:
        try:
            s = self._dial()
        except FileNotFoundError:
            raise NoControlSocket(self.path) from None
        self._sock, self._file = s, s.makefile("rwb")

    def _dial(self) -> socket.socket:
        if self.uid is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            return s
        return ownedsock.dial(os.path.dirname(self.path) or ".", os.path.basename(self.path), self.uid,
                              self.timeout)

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                self._file.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                self._file.flush()
                self._sock.settimeout(self.reply_timeout)
                try:
                    line = self._file.readline(MAX_REPLY_BYTES + 1)
                finally:
                    self._sock.settimeout(self.timeout)
            except OSError:
                self.close()
                raise
            if not line:
                self.close()
                raise ConnectionError(f"{self.path}: the workload closed the control socket during {cmd!r}")
            if len(line) > MAX_REPLY_BYTES:
                self.close()
                raise ReplyTooLong(f"{self.path}: the workload's reply to {cmd!r} is longer than "
                                   f"{MAX_REPLY_BYTES} bytes (MAX_REPLY_BYTES)")
        try:
            reply = json.loads(line)
        except ValueError as e:
            self.close()
            raise ConnectionError(f"{self.path}: the workload's reply to {cmd!r} is not JSON: {e}") from e
        if not isinstance(reply, dict):
            raise ConnectionError(f"{self.path}: the workload's reply to {cmd!r} is not a JSON object")
        if not reply.pop("ok", False):
            raise CommandError(cmd, reply.get("error", "Error"), reply.get("message", ""))
        return reply

    def abort(self) -> None:
        """Ends a `call` another thread waits in (its reply is not wanted any more): shuts the socket down,
        which wakes the read (the call raises ConnectionError); the next call connects again."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._file.close()
                self._sock.close()
            finally:
                self._sock = self._file = None

    def __enter__(self) -> "AgentLink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """The workload's side: serves commands on a Unix socket from daemon threads."""

    def __init__(self, path: str, handle: Handler) -> None:
        self.path = path
        self.handle = handle
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self._closed = False
        threading.Thread(target=self._accept, name="gpumesh-ckpt-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="gpumesh-ckpt-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_lines(conn)
        except OSError:
            pass    # the agent went away (it gave the call up): the answer left unsent is flushed again on close

    def _serve_lines(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    req = json.loads(line)
                    reply = {"ok": True, **(self.handle(req) or {})}
                except Exception as exc:  # every failure goes back to the agent, typed
                    reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                try:
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
