"""The transfer channel's receiving side: `TransferServer`, which admits a session's streams (the hello: its
proof, peer, replay) and runs each (mesh/checkpoint/transfer_stream.py) into its `ReceiveSession`
(mesh/checkpoint/transfer_session.py; its sinks: mesh/checkpoint/transfer_sinks.py). See
mesh/checkpoint/transfer.py for the protocol."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from struct import error as struct_error
from typing import Any

import grpc

from mesh.checkpoint.format import CheckpointError
from mesh.checkpoint.transfer_auth import TransferAuthError, check_hello, server_answer
from mesh.checkpoint.transfer_session import ReceiveSession, _Abort
from mesh.checkpoint.transfer_sinks import Sink
from mesh.checkpoint.transfer_stream import _Idle, _Pipeline, _Reader
from mesh.checkpoint.transfer_wire import SERVER_OPTIONS, SERVICE, TransferError, frame, unframe
from mesh.logs import log

logger = logging.getLogger(__name__)

MAX_SESSION_STREAMS = 1 << 16
"""streams (hellos) one session hears: a sender opens one per send and per retry after a cut."""
HELLO_TIMEOUT_S = 10.0
"""how long a stream may stay open before its hello (the sender sends it first, at once): a stream
waiting for it holds one of the server's workers."""
IDLE_TIMEOUT_S = 120.0
"""the default of `TransferServer(idle_timeout_s=)`: how long a stream may send nothing between two frames
before it is given up (DEADLINE_EXCEEDED) and the session's lock released. A 4 MiB chunk in 120 s is 35 kB/s;
a sender whose connection died silently is found sooner by the keepalive pings (transfer_wire.py)."""


def check_idle_timeout(value: Any, field: str = "idle_timeout_s") -> float:
    """`value` as the idle timeout between frames: seconds, a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{field}: {value!r} (allowed: seconds, a finite number above 0)")
    return float(value)


class TransferServer:
    """Receives pushes for the sessions it `expect`s. `address` may be `host:port` (port 0 picks
    one; see `.address`) or `unix:/path`."""

    def __init__(self, address: str = "127.0.0.1:0", max_workers: int = 16, credentials: Any = None,
                 max_concurrent: int = 32, idle_timeout_s: float | None = None) -> None:
        """`credentials`: grpc server credentials (the agent's mTLS) or None: plaintext gRPC; every
        frame is sealed with the session's keys either way (transfer_auth.py). Each stream holds a
        worker thread while it lasts: a stream's hello must come within HELLO_TIMEOUT_S, and streams
        beyond `max_concurrent` are refused (RESOURCE_EXHAUSTED) rather than queued, so idle
        streams of anyone who can connect cannot hold every worker from the session's sender.
        `idle_timeout_s` (default IDLE_TIMEOUT_S): a stream that sends no frame for this long is given
        up (DEADLINE_EXCEEDED), releasing its session for the sender's retry, which resumes."""
        self.idle_timeout_s = check_idle_timeout(IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s)
        self.sessions: dict[str, ReceiveSession] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS,
                                  maximum_concurrent_rpcs=max_concurrent)
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Push": grpc.stream_stream_rpc_method_handler(self._push)})
        self.server.add_generic_rpc_handlers((handler,))
        port = (self.server.add_secure_port(address, credentials) if credentials is not None
                else self.server.add_insecure_port(address))
        if port == 0:
            raise TransferError(f"cannot listen on {address}")
        self.address = address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"

    def start(self) -> "TransferServer":
        self.server.start()
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        self.server.stop(grace).wait()
        for s in list(self.sessions.values()):
            if s.ring is not None:
                s.ring.close()

    def expect(self, session: str, sink: Sink, allow_unchecked: bool = False, mesh: bool = False, *,
               secret: bytes, peer: str = "") -> ReceiveSession:
        """Accepts pushes to `session` into `sink` from senders that prove `secret` (at least 128
        random bits; transfer_auth.py) and, with `peer` (mTLS servers), whose verified certificate
        names `peer` (the source agent's node). `allow_unchecked` lets a sender skip checksums
        (for measuring the raw channel only); `mesh` offers senders a shared-memory ring for the
        chunk payloads (mesh/checkpoint/transfer_mesh.py; used by senders on this host)."""
        with self._lock:
            s = self.sessions.get(session)
            if s is None:
                ring = None
                if mesh:
                    from mesh.checkpoint.transfer_mesh import ShmRing
                    try:
                        ring = ShmRing()
                    except OSError:
                        ring = None         # no /dev/shm here: the stream carries everything
                s = self.sessions[session] = ReceiveSession(session, sink, allow_unchecked, ring, secret=secret)
                s.peer = peer
            elif not _same(s.secret, secret):
                raise TransferAuthError(f"transfer session {session!r} is expected already, with another secret")
            return s

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        # a sync request iterator takes no deadline: a timer cancels the RPC (thread-safe; abort is not),
        # which ends the wait below with an RpcError
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            context.cancel()
        timer = threading.Timer(HELLO_TIMEOUT_S, expire)
        timer.daemon = True
        timer.start()
        try:
            first = next(requests)
        except StopIteration:
            return
        except grpc.RpcError:
            if expired.is_set():
                log(logger, logging.WARNING, "transfer push refused", peer=context.peer(),
                    reason=f"no hello within {HELLO_TIMEOUT_S} s")
            return
        finally:
            timer.cancel()
        try:
            hello, _ = unframe(first)
            name = str(hello.get("session", "")) if isinstance(hello, dict) else ""
        except (ValueError, TypeError, UnicodeDecodeError, struct_error):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is not a transfer hello frame")
        if not isinstance(hello, dict):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is not a transfer hello frame")
        session = self.sessions.get(name)
        if hello.get("t") != "hello" or session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no transfer session {name!r} here")
        if session.peer:
            names = [n.decode(errors="replace") for n in (context.auth_context() or {}).get("x509_common_name", [])]
            if session.peer not in names:
                log(logger, logging.WARNING, "transfer push refused", session=session.session, peer=context.peer(),
                    reason=f"certificate names {names}, expected {session.peer}")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"transfer session {session.session!r} takes pushes "
                              f"from {session.peer!r} only (the peer's certificate names {names or 'nobody'})")
        try:
            nonce_c = check_hello(session.secret, session.session, hello)
        except TransferAuthError as exc:
            log(logger, logging.WARNING, "transfer push refused", session=session.session, peer=context.peer(),
                reason="no proof of the session's secret")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        # the proof covers the sender's nonce only: a hello recorded off the wire proves the secret again. Its
        # stream could open no frame, but it would take the session's lock below and, held open, keep every
        # later stream of the real sender out. A sender draws a new nonce for every stream.
        with self._lock:
            replayed = nonce_c in session.hellos
            full = not replayed and len(session.hellos) >= MAX_SESSION_STREAMS
            if not replayed and not full:
                session.hellos.add(nonce_c)
        if replayed:
            log(logger, logging.WARNING, "transfer push refused", session=session.session, peer=context.peer(),
                reason="a replayed hello")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"transfer session {session.session!r}: the hello was "
                          f"heard before (replayed): a sender draws a new nonce for every stream")
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"transfer session {session.session!r} heard "
                          f"{MAX_SESSION_STREAMS} streams already (MAX_SESSION_STREAMS)")
        with session.lock:
            ring = session.ring if session.ring is not None and session.ring.view is not None else None
            if ring is not None:
                ring.reset()        # frames in flight died with the last stream
            channel, answer = server_answer(session.secret, session.session, nonce_c, frame(
                {"t": "have", "entries": session.have(), "committed": session.committed is not None,
                 **({"mesh": ring.offer()} if ring is not None else {})}))
            yield answer
            t0 = time.perf_counter()
            n0 = session.bytes_received
            pipe = _Pipeline(session, ring, channel)
            reader = _Reader(requests, session.session)
            session.streams += 1            # decremented below, whatever ends the stream
            session.last_frame = time.monotonic()
            try:
                while (msg := reader.next(self.idle_timeout_s)) is not None:
                    session.last_frame = time.monotonic()
                    pipe.put(msg)           # opened, checked and written by the pipeline's thread, in order
                pipe.finish()
            except _Idle:
                why = (f"transfer session {session.session!r}: the sender sent no frame for "
                       f"{self.idle_timeout_s:g} s (idle timeout)")
                log(logger, logging.WARNING, "transfer stream given up", session=session.session,
                    peer=context.peer(), reason=f"no frame for {self.idle_timeout_s:g} s")
                session.stalled_reason = why
                session.stalled.set()
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{why}: the stream is given up; a retry "
                              f"resumes from what arrived")
            except _Abort as exc:
                context.abort(exc.code, exc.message)
            except CheckpointError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            finally:
                session.streams -= 1
                reader.stop()
                pipe.stop()
            yield channel.seal(frame({"t": "done", "bytes": session.bytes_received - n0,
                                      "seconds": time.perf_counter() - t0, "committed": session.committed}))


def _same(a: bytes, b: Any) -> bool:
    import hmac
    return isinstance(b, (bytes, bytearray)) and hmac.compare_digest(a, bytes(b))
