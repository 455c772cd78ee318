"""The transfer channel's receiving side: `ReceiveSession`, `TransferServer` (its sinks:
mesh/checkpoint/transfer_sinks.py). See mesh/checkpoint/transfer.py for the protocol."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from struct import error as struct_error
from typing import Any

import grpc

from mesh.checkpoint.format import (DEFAULT_CHECKSUM, CheckpointError, EntryMeta, FormatError, Manifest, chunk_sum,
                                    new_hasher)
from mesh.checkpoint.transfer_auth import Channel, TransferAuthError, check_hello, check_secret, server_answer
from mesh.checkpoint.transfer_sinks import BufferTarget, EntryTarget, Sink
from mesh.checkpoint.transfer_wire import SERVER_OPTIONS, SERVICE, TransferError, cumulative_sum, frame, unframe
from mesh.logs import log

logger = logging.getLogger(__name__)

# --- receiving ------------------------------------------------------------------------------

@dataclass
class _RecvEntry:
    meta: EntryMeta
    gen: int
    target: EntryTarget
    algo: str = DEFAULT_CHECKSUM
    hasher: Any = None
    offset: int = 0
    done: bool = False
    checksum: str = ""
    payload: bytearray | None = None  # data entries are kept in memory for the sink's commit
    cumulative: bool = False          # chunk checks are the running digest (one pass), else CRC/xxh3-64


class ReceiveSession:
    """What one session has received; survives broken streams."""

    def __init__(self, session: str, sink: Sink, allow_unchecked: bool = False, ring: Any = None, *,
                 secret: bytes) -> None:
        self.session = session
        self.secret = check_secret(secret, f"transfer session {session!r}")
        self.peer = ""              # the certificate name a sender must present (mTLS), or any
        self.ring = ring            # a transfer_mesh.ShmRing offered to senders, or None
        self.sink = sink
        self.allow_unchecked = allow_unchecked
        self.entries: dict[str, _RecvEntry] = {}
        self.data_bytes = 0         # what the entries' in-memory payloads hold (MAX_SESSION_DATA)
        self.lock = threading.Lock()
        self.bytes_received = 0
        self.committed: dict[str, Any] | None = None
        self.committed_event = threading.Event()
        self.manifest: Manifest | None = None
        self.hellos: set[bytes] = set()    # the senders' nonces of the hellos heard: a replayed one is refused
        self.stalled = threading.Event()
        """set when a stream of this session was given up for sending nothing within the idle timeout (its
        sender may retry: the session takes it); `stalled_reason` says so. The session's owner may give up."""
        self.stalled_reason = ""

    def have(self) -> dict[str, list[Any]]:
        return {n: [e.gen, e.offset, e.done] for n, e in self.entries.items()}

    def begin(self, meta: EntryMeta, gen: int, offset: int, algo: str, check: str = "") -> _RecvEntry:
        cur = self.entries.get(meta.name)
        if offset:
            if cur is None or cur.gen != gen or cur.offset != offset or cur.done:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"entry {meta.name!r}: cannot resume generation {gen} at byte {offset}")
            cur.cumulative = check == "cumulative"
            return cur
        try:
            hasher = new_hasher(algo)
        except FormatError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"entry {meta.name!r}: {exc}") from None
        if cur is None and len(self.entries) >= MAX_SESSION_ENTRIES:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"entry {meta.name!r}: session {self.session!r} holds "
                         f"{len(self.entries)} entries already (allowed: at most {MAX_SESSION_ENTRIES})")
        if meta.kind == "data":
            if meta.nbytes > MAX_DATA_ENTRY:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"entry {meta.name!r}: a data entry of {meta.nbytes} "
                             f"bytes (allowed: at most {MAX_DATA_ENTRY})")
            held = self.data_bytes - (len(cur.payload) if cur is not None and cur.payload is not None else 0)
            if held + meta.nbytes > MAX_SESSION_DATA:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"entry {meta.name!r}: a data entry of {meta.nbytes} "
                             f"bytes with {held} held already (allowed: at most {MAX_SESSION_DATA} bytes of data "
                             f"entries in a session)")
            self._drop(meta.name)           # the replaced entry's buffer goes before the new one is allocated
            buf = bytearray(meta.nbytes)
            self.data_bytes += len(buf)
            e = _RecvEntry(meta, gen, BufferTarget(memoryview(buf)), algo, hasher, payload=buf)
        else:
            self._drop(meta.name)
            e = _RecvEntry(meta, gen, self.sink.open_entry(meta), algo, hasher)
        e.cumulative = check == "cumulative"
        self.entries[meta.name] = e
        return e

    def _drop(self, name: str) -> None:
        """Forget entry `name` and release its in-memory payload (a pipeline may still hold the entry)."""
        e = self.entries.pop(name, None)
        if e is not None and e.payload is not None:
            self.data_bytes -= len(e.payload)
            e.payload = None
            e.target = BufferTarget(memoryview(bytearray(0)))

    def chunk(self, e: _RecvEntry, header: dict[str, Any], data: memoryview) -> None:
        if header["offset"] != e.offset:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"entry {e.meta.name!r}: chunk at byte {header['offset']}, expected {e.offset}")
        if e.offset + len(data) > e.meta.nbytes:
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"entry {e.meta.name!r}: more than {e.meta.nbytes} bytes")
        if header["sum"] < 0:
            if not self.allow_unchecked:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"session {self.session!r} takes only checked chunks")
            e.target.write(e.offset, data)
            e.offset += len(data)
            self.bytes_received += len(data)
            return
        if e.cumulative:
            before = e.hasher.copy()
            e.hasher.update(data)
            got = cumulative_sum(e.hasher)
        else:
            got = chunk_sum(data, e.algo)
        if got != header["sum"]:
            if e.cumulative:
                e.hasher = before
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"entry {e.meta.name!r}: chunk at byte {e.offset} "
                         f"failed its check (expected {header['sum']:x}, got {got:x})")
        e.target.write(e.offset, data)
        if not e.cumulative:
            e.hasher.update(data)
        e.offset += len(data)
        self.bytes_received += len(data)

    def end(self, e: _RecvEntry, checksum: str) -> None:
        if not checksum and self.allow_unchecked:
            e.done = e.offset == e.meta.nbytes
            return
        actual = e.hasher.hexdigest()
        if e.offset != e.meta.nbytes or actual != checksum:
            if self.entries.get(e.meta.name) is e:
                self._drop(e.meta.name)
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"entry {e.meta.name!r}: {e.algo} mismatch "
                         f"({e.offset} of {e.meta.nbytes} bytes, expected {checksum[:16]}..., got {actual[:16]}...)")
        e.done = True
        e.checksum = actual

    def commit(self, manifest: Manifest) -> dict[str, Any]:
        """The manifest is what the sink keeps (the store's manifest, what a restore sends): each of its entries
        must have arrived whole, once, as it describes it (kind, size, dtype, shape) and with its checksum."""
        named: set[str] = set()
        for m in manifest.entries:
            if m.name in named:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"commit: entry {m.name!r} is in the manifest twice")
            named.add(m.name)
            e = self.entries.get(m.name)
            if e is None or not e.done:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"commit: entry {m.name!r} has not arrived whole")
            if e.checksum != m.checksum:
                raise _Abort(grpc.StatusCode.DATA_LOSS, f"commit: entry {m.name!r} holds checksum "
                             f"{e.checksum[:16]}..., the manifest says {m.checksum[:16]}...")
            got, said = _described(e.meta), _described(m)
            if got != said:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"commit: entry {m.name!r} arrived as {got}, the "
                             f"manifest says {said}")
        data = {m.name: bytes(self.entries[m.name].payload or b"") for m in manifest.entries if m.kind == "data"}
        self.committed = self.sink.commit(manifest, data) or {}
        self.manifest = manifest
        self.committed_event.set()
        return self.committed


def _described(meta: EntryMeta) -> str:
    return f"{meta.kind} {meta.dtype or '-'}{list(meta.shape)} of {meta.nbytes} bytes"


MAX_DATA_ENTRY = 64 << 20
"""data entries (step, extras, RNG, optimizer hyper-parameters) are small and held in memory."""
MAX_SESSION_DATA = 4 * MAX_DATA_ENTRY
"""all the data entries one session holds in memory together: each `begin` of a data entry allocates its
bytes at once, so without this bound a sender's small frames could make the receiver (the agent) allocate
without end."""
MAX_SESSION_ENTRIES = 1 << 16
"""entries (of any kind) one session holds: a checkpoint's tensors and data entries are thousands at most."""
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


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Idle(Exception):
    """No message within the idle timeout."""


class _Reader:
    """Takes a stream's messages on a helper thread, so that the handler waits for each with a limit
    (`next`): a sync gRPC request iterator takes none, and only the handler's thread can answer the
    stream a status (context.abort)."""

    _END = object()

    def __init__(self, requests: Iterator[bytes], name: str) -> None:
        self.requests = requests
        self.q: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"transfer-read-{name}")
        self.thread.start()

    def next(self, timeout: float) -> bytes | None:
        """The next message, None at the stream's end; raises _Idle when none came within `timeout`
        seconds, or the stream's own error."""
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise _Idle() from None
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        """The handler is done: whatever still comes is dropped (the thread ends with the stream)."""
        self.stopped.set()

    def _run(self) -> None:
        try:
            for msg in self.requests:
                if not self._put(msg):
                    return
            self._put(self._END)
        except BaseException as exc:   # noqa: BLE001 - handed to the stream's handler
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class _Pipeline:
    """Processes one stream's frames in order on a helper thread, so the stream's handler takes
    the next message while this one is checked (the hashing releases the GIL) and copied into
    its target. The first error stops it and is raised to the handler by `put` or `finish`."""

    DEPTH = 4

    def __init__(self, session: ReceiveSession, ring: Any, channel: Channel) -> None:
        self.session, self.ring, self.channel = session, ring, channel
        self.cur: _RecvEntry | None = None
        self.error: BaseException | None = None
        self.q: queue.Queue[Any] = queue.Queue(maxsize=self.DEPTH)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"transfer-recv-{session.session}")
        self.thread.start()

    def put(self, msg: bytes) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(msg, timeout=0.1)
                return
            except queue.Full:
                if not self.thread.is_alive() and self.error is None:
                    raise _Abort(grpc.StatusCode.INTERNAL, "the transfer pipeline ended")

    def finish(self) -> None:
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or _Abort(grpc.StatusCode.CANCELLED, "stream ended")
            try:
                self.q.put_nowait(None)
            except queue.Full:
                pass
            self.thread.join(30)

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is None or self.error is not None:
                return
            try:
                self._frame(msg)
            except (KeyError, ValueError, TypeError, OverflowError, struct_error) as exc:
                # a field missing or of another type, a number JSON spells as Infinity: the sender's fault, said
                # so (INVALID_ARGUMENT), never an UNKNOWN error of the server
                self.error = _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc!r}")
                return
            except BaseException as exc:   # noqa: BLE001 - handed to the stream's handler
                self.error = exc
                return

    def _frame(self, msg: bytes) -> None:
        session, ring = self.session, self.ring
        try:
            h, data = unframe(self.channel.open(msg))     # opened first: nothing of a forged frame is used
        except TransferAuthError as exc:
            raise _Abort(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        except (ValueError, TypeError, UnicodeDecodeError, struct_error) as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}") from None
        kind = h.get("t") if isinstance(h, dict) else None
        if kind == "chunk":
            if self.cur is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "chunk before begin")
            if "slot" in h:
                if ring is None:
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "chunk in a ring slot, no ring")
                try:
                    session.chunk(self.cur, h, ring.take(int(h["slot"]), int(h["n"])))
                except ValueError as exc:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                finally:
                    ring.release(int(h["slot"]))
            else:
                session.chunk(self.cur, h, data)
        elif kind == "begin":
            try:
                meta = EntryMeta.from_json(h["meta"])
            except FormatError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            self.cur = session.begin(meta, int(h["gen"]), int(h["offset"]),
                                     h.get("algo", "sha256"), h.get("check", ""))
        elif kind == "end":
            if self.cur is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "end before begin")
            session.end(self.cur, h["checksum"])
            self.cur = None
        elif kind == "commit":
            try:
                manifest = Manifest.from_json(h["manifest"])
            except FormatError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            session.commit(manifest)
        else:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown frame {kind!r}")


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
            try:
                while (msg := reader.next(self.idle_timeout_s)) is not None:
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
                reader.stop()
                pipe.stop()
            yield channel.seal(frame({"t": "done", "bytes": session.bytes_received - n0,
                                      "seconds": time.perf_counter() - t0, "committed": session.committed}))


def _same(a: bytes, b: Any) -> bool:
    import hmac
    return isinstance(b, (bytes, bytearray)) and hmac.compare_digest(a, bytes(b))
