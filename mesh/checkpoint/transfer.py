"""The transfer channel: checkpoint entries streamed between two endpoints over gRPC.

One bidirectional stream method, `/gpumesh.checkpoint.v1.Transfer/Push`, with raw
bytes messages (generic handler, identity serializers: no proto, no pickle). Each
message is a *frame*: a 4-byte little-endian header length, a JSON header, then the
payload. The sender speaks first:

    hello  {session}                         -> receiver answers `have`: what it holds per
                                                entry (generation, contiguous bytes, done)
    begin  {meta, gen, offset, algo}         start an entry, or resume it at `offset`
    chunk  {offset, sum} + bytes             up to CHUNK_BYTES of the current entry; `sum` is
                                             xxh3-64 (CRC-32 with sha256 entries) of the chunk
    end    {checksum}                        the whole entry's checksum (xxh3-128 or SHA-256);
                                             checked by the receiver
    commit {manifest}                        every entry of the manifest is here with its
                                             checksum: hand the checkpoint to the sink
    (stream closed)                          -> receiver answers `done` {bytes, committed}

A broken stream loses nothing that was received: the sender reconnects, reads the
`have` map and continues each entry from the receiver's offset (it keeps the hash
state of every chunk boundary of the entry in flight, so the end-to-end checksum
still covers the whole entry). A chunk that fails its check aborts the stream with
DATA_LOSS and is resent on the retry; an entry whose checksum differs is reset and
resent from its start; after `retries` attempts the sender raises `TransferError`
naming the entry.

Generations let pre-copy resend an entry that changed: a `begin` with a newer
generation replaces what the receiver holds; one the receiver already has whole is
skipped.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from mesh.checkpoint.format import (CHUNK_BYTES, DEFAULT_CHECKSUM, CheckpointError, CheckpointWriter, EntryMeta,
                                    FormatError, Manifest, chunk_sum, entry_file, new_hasher)

SERVICE = "gpumesh.checkpoint.v1.Transfer"
PUSH = f"/{SERVICE}/Push"
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class TransferError(CheckpointError):
    """A transfer failed for good (after retries); `entry` names the entry when one is to blame."""

    def __init__(self, message: str, entry: str = "") -> None:
        super().__init__(message)
        self.entry = entry


# --- frames ---------------------------------------------------------------------------------

def frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack("<I", len(h)), h, payload))


def unframe(message: bytes) -> tuple[dict[str, Any], memoryview]:
    mv = memoryview(message)
    (n,) = struct.unpack_from("<I", mv)
    return json.loads(bytes(mv[4:4 + n])), mv[4 + n:]


# --- receiving ------------------------------------------------------------------------------

class EntryTarget(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...


class Sink(Protocol):
    """Where a receiving session puts entries."""

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        """Called at the start of each (re)sent entry; may be called again for a newer generation."""

    def commit(self, manifest: Manifest, pickles: dict[str, bytes]) -> dict[str, Any]:
        """Every entry of `manifest` has arrived and checked out; `pickles` holds the bytes of its
        pickle entries. Returns facts for the sender's `done` answer."""


class BufferTarget:
    """Writes into a memoryview (a tensor's bytes, or a bytearray)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf

    def write(self, offset: int, data: memoryview) -> None:
        self.buf[offset:offset + len(data)] = data


class NullSink:
    """Discards everything: for measuring the channel."""

    class _Null:
        def write(self, offset: int, data: memoryview) -> None:
            pass

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        return self._Null()

    def commit(self, manifest: Manifest, pickles: dict[str, bytes]) -> dict[str, Any]:
        return {}


class DirectorySink:
    """Receives into a checkpoint directory (the store); the manifest is written on commit."""

    def __init__(self, path: str, workload_id: str = "") -> None:
        self.writer = CheckpointWriter(path, workload_id)
        self.files: dict[str, str] = {}

    class _File:
        def __init__(self, path: Any) -> None:
            self.path = path

        def write(self, offset: int, data: memoryview) -> None:
            with open(self.path, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def open_entry(self, meta: EntryMeta) -> EntryTarget:
        rel = self.files.setdefault(meta.name, entry_file(len(self.files)))
        path = self.writer.tmp / rel
        with open(path, "wb") as f:
            f.truncate(meta.nbytes)
        return self._File(path)

    def commit(self, manifest: Manifest, pickles: dict[str, bytes]) -> dict[str, Any]:
        entries = [EntryMeta(**{**e.to_json(), "file": self.files[e.name]}) for e in manifest.entries]
        self.writer.commit_manifest(Manifest(workload_id=manifest.workload_id, step=manifest.step, entries=entries,
                                             created=manifest.created, extras=manifest.extras))
        return {"path": str(self.writer.path)}


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
    payload: bytearray | None = None  # pickle entries are kept in memory for the sink's commit


class ReceiveSession:
    """What one session has received; survives broken streams."""

    def __init__(self, session: str, sink: Sink, allow_unchecked: bool = False) -> None:
        self.session = session
        self.sink = sink
        self.allow_unchecked = allow_unchecked
        self.entries: dict[str, _RecvEntry] = {}
        self.lock = threading.Lock()
        self.bytes_received = 0
        self.committed: dict[str, Any] | None = None
        self.committed_event = threading.Event()
        self.manifest: Manifest | None = None

    def have(self) -> dict[str, list[Any]]:
        return {n: [e.gen, e.offset, e.done] for n, e in self.entries.items()}

    def begin(self, meta: EntryMeta, gen: int, offset: int, algo: str) -> _RecvEntry:
        cur = self.entries.get(meta.name)
        if offset:
            if cur is None or cur.gen != gen or cur.offset != offset or cur.done:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"entry {meta.name!r}: cannot resume generation {gen} at byte {offset}")
            return cur
        try:
            hasher = new_hasher(algo)
        except FormatError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"entry {meta.name!r}: {exc}") from None
        if meta.kind == "pickle":
            buf = bytearray(meta.nbytes)
            e = _RecvEntry(meta, gen, BufferTarget(memoryview(buf)), algo, hasher, payload=buf)
        else:
            e = _RecvEntry(meta, gen, self.sink.open_entry(meta), algo, hasher)
        self.entries[meta.name] = e
        return e

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
        got = chunk_sum(data, e.algo)
        if got != header["sum"]:
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"entry {e.meta.name!r}: chunk at byte {e.offset} "
                         f"failed its check (expected {header['sum']:x}, got {got:x})")
        e.target.write(e.offset, data)
        e.hasher.update(data)
        e.offset += len(data)
        self.bytes_received += len(data)

    def end(self, e: _RecvEntry, checksum: str) -> None:
        if not checksum and self.allow_unchecked:
            e.done = e.offset == e.meta.nbytes
            return
        actual = e.hasher.hexdigest()
        if e.offset != e.meta.nbytes or actual != checksum:
            del self.entries[e.meta.name]
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"entry {e.meta.name!r}: {e.algo} mismatch "
                         f"({e.offset} of {e.meta.nbytes} bytes, expected {checksum[:16]}..., got {actual[:16]}...)")
        e.done = True
        e.checksum = actual

    def commit(self, manifest: Manifest) -> dict[str, Any]:
        for m in manifest.entries:
            e = self.entries.get(m.name)
            if e is None or not e.done:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"commit: entry {m.name!r} has not arrived whole")
            if e.checksum != m.checksum:
                raise _Abort(grpc.StatusCode.DATA_LOSS, f"commit: entry {m.name!r} holds checksum "
                             f"{e.checksum[:16]}..., the manifest says {m.checksum[:16]}...")
        pickles = {m.name: bytes(self.entries[m.name].payload or b"") for m in manifest.entries if m.kind == "pickle"}
        self.committed = self.sink.commit(manifest, pickles) or {}
        self.manifest = manifest
        self.committed_event.set()
        return self.committed


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TransferServer:
    """Receives pushes for the sessions it `expect`s. `address` may be `host:port` (port 0 picks
    one; see `.address`) or `unix:/path`."""

    def __init__(self, address: str = "127.0.0.1:0", max_workers: int = 4) -> None:
        self.sessions: dict[str, ReceiveSession] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "Push": grpc.stream_stream_rpc_method_handler(self._push)})
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port(address)
        if port == 0:
            raise TransferError(f"cannot listen on {address}")
        self.address = address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"

    def start(self) -> "TransferServer":
        self.server.start()
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        self.server.stop(grace).wait()

    def expect(self, session: str, sink: Sink, allow_unchecked: bool = False) -> ReceiveSession:
        """Accepts pushes to `session` into `sink`. `allow_unchecked` lets a sender skip checksums
        (for measuring the raw channel only)."""
        with self._lock:
            s = self.sessions.get(session)
            if s is None:
                s = self.sessions[session] = ReceiveSession(session, sink, allow_unchecked)
            return s

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            first = next(requests)
        except StopIteration:
            return
        hello, _ = unframe(first)
        session = self.sessions.get(hello.get("session", ""))
        if hello.get("t") != "hello" or session is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no transfer session {hello.get('session')!r} here")
        with session.lock:
            yield frame({"t": "have", "entries": session.have(), "committed": session.committed is not None})
            cur: _RecvEntry | None = None
            t0 = time.perf_counter()
            n0 = session.bytes_received
            try:
                for msg in requests:
                    h, data = unframe(msg)
                    kind = h["t"]
                    if kind == "chunk":
                        if cur is None:
                            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "chunk before begin")
                        session.chunk(cur, h, data)
                    elif kind == "begin":
                        cur = session.begin(EntryMeta.from_json(h["meta"]), int(h["gen"]), int(h["offset"]),
                                            h.get("algo", "sha256"))
                    elif kind == "end":
                        if cur is None:
                            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "end before begin")
                        session.end(cur, h["checksum"])
                        cur = None
                    elif kind == "commit":
                        session.commit(Manifest.from_json(h["manifest"]))
                    else:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown frame {kind!r}")
            except _Abort as exc:
                context.abort(exc.code, exc.message)
            except CheckpointError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            yield frame({"t": "done", "bytes": session.bytes_received - n0, "seconds": time.perf_counter() - t0,
                         "committed": session.committed})


# --- sending --------------------------------------------------------------------------------

@dataclass
class OutEntry:
    """An entry to send: its meta (nbytes, dtype, shape), a generation, and its chunks from a byte offset."""

    meta: EntryMeta
    chunks: Callable[[int], Iterable[bytes | memoryview]]
    gen: int = 0


@dataclass
class SendStats:
    bytes: int = 0
    seconds: float = 0.0
    entries: int = 0
    skipped: int = 0
    attempts: int = 0
    checksums: dict[str, str] = field(default_factory=dict)
    committed: dict[str, Any] | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int, int, float], None]
"""progress(bytes_sent, bytes_total, seconds) after each chunk."""


class TransferClient:
    """Pushes entries to one session of a TransferServer, resuming after broken streams."""

    def __init__(self, target: str, session: str, *, chunk_bytes: int = CHUNK_BYTES, retries: int = 5,
                 progress: ProgressFn | None = None, connect_timeout: float = 30.0, verify: bool = True) -> None:
        self.target = target
        self.session = session
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        self.progress = progress
        self.connect_timeout = connect_timeout
        self.verify = verify
        self.algo = DEFAULT_CHECKSUM
        """False: no CRC or SHA-256 (raw channel measurements; the session must allow it)."""
        self.channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        self._push = self.channel.stream_stream(PUSH)
        self.cut_after_bytes: int | None = None
        """test hook: cancel the stream once this many bytes went out (simulates a cut connection)."""

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "TransferClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, entries: list[OutEntry],
             commit: Manifest | Callable[[SendStats], Manifest] | None = None) -> SendStats:
        """Sends `entries` (skipping those the receiver holds whole at the same generation), then
        commits a manifest when given: a Manifest, or a function of this send's stats (its
        `checksums` of the entries just sent) called once they are all out."""
        stats = SendStats()
        total = sum(e.meta.nbytes for e in entries)
        partial: dict[str, tuple[int, dict[int, Any]]] = {}  # name -> (gen, {offset: hasher})
        t0 = time.perf_counter()
        last_error = ""
        entry_in_flight = [""]
        for attempt in range(self.retries + 1):
            stats.attempts = attempt + 1
            have_box: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
            cut = [False]

            def requests() -> Iterator[bytes]:
                yield frame({"t": "hello", "session": self.session})
                have = have_box.get()
                if have.get("_stop"):
                    return
                held = have["entries"]
                for e in entries:
                    name = e.meta.name
                    h = held.get(name)
                    if h is not None and h[0] == e.gen and h[2]:
                        if name not in stats.checksums:
                            stats.skipped += 1
                        continue
                    start, hasher = 0, new_hasher(self.algo)
                    if h is not None and h[0] == e.gen and h[1] and name in partial and partial[name][0] == e.gen:
                        snap = partial[name][1].get(h[1])
                        if snap is not None:
                            start, hasher = h[1], snap.copy()
                    boundaries = {start: hasher.copy()}
                    partial[name] = (e.gen, boundaries)
                    entry_in_flight[0] = name
                    yield frame({"t": "begin", "meta": e.meta.to_json(), "gen": e.gen, "offset": start,
                                 "algo": self.algo})
                    off = start
                    for chunk in e.chunks(start):
                        if not isinstance(chunk, memoryview):
                            chunk = memoryview(chunk)
                        if self.verify:
                            hasher.update(chunk)
                        csum = chunk_sum(chunk, self.algo) if self.verify else -1
                        yield frame({"t": "chunk", "offset": off, "sum": csum}, chunk)
                        off += len(chunk)
                        if self.verify:
                            boundaries[off] = hasher.copy()
                        stats.bytes += len(chunk)
                        if self.progress:
                            self.progress(stats.bytes, total, time.perf_counter() - t0)
                        if self.cut_after_bytes is not None and stats.bytes >= self.cut_after_bytes:
                            self.cut_after_bytes = None
                            cut[0] = True
                            call.cancel()
                            return
                    if off != e.meta.nbytes:
                        raise TransferError(f"entry {name!r}: produced {off} bytes, declared {e.meta.nbytes}", name)
                    digest = hasher.hexdigest() if self.verify else ""
                    yield frame({"t": "end", "checksum": digest})
                    stats.checksums[name] = digest
                    stats.entries += 1
                    partial.pop(name, None)
                if commit is not None:
                    manifest = commit(stats) if callable(commit) else commit
                    yield frame({"t": "commit", "manifest": manifest.to_json()})

            call = self._push(requests(), wait_for_ready=True)
            unreachable = [False]

            def give_up() -> None:
                unreachable[0] = True
                call.cancel()
            timer = threading.Timer(self.connect_timeout, give_up)
            timer.daemon = True
            timer.start()
            try:
                try:
                    first, _ = unframe(next(call))
                finally:
                    timer.cancel()
                have_box.put(first)
                done = None
                for msg in call:
                    done, _ = unframe(msg)
                stats.seconds = time.perf_counter() - t0
                stats.committed = done.get("committed") if done else None
                return stats
            except grpc.RpcError as exc:
                if have_box.empty():
                    have_box.put({"_stop": True})
                if unreachable[0]:
                    raise TransferError(f"cannot reach the transfer endpoint {self.target} "
                                        f"within {self.connect_timeout:g} s") from None
                code = exc.code() if hasattr(exc, "code") else None
                last_error = f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}"
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) and not cut[0]:
                    break
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    partial.clear()
                time.sleep(min(0.05 * (2 ** attempt), 1.0) if not cut[0] else 0)
        raise TransferError(f"transfer to {self.target} (session {self.session}) failed after "
                            f"{stats.attempts} attempts: {last_error}", entry_in_flight[0])


def raw_entries(nbytes: int, chunk_bytes: int = CHUNK_BYTES, entry_bytes: int = 64 << 20,
                gen: int = 0) -> list[OutEntry]:
    """`nbytes` of synthetic entries that share one buffer: for measuring the channel (a new
    `gen` for each send to the same session, or the receiver skips what it holds)."""
    buf = memoryview(bytes(range(256)) * (entry_bytes // 256 + 1))[:entry_bytes]
    out = []
    i = 0
    while nbytes > 0:
        n = min(nbytes, entry_bytes)
        view = buf[:n]
        out.append(OutEntry(EntryMeta(name=f"raw/{i}", kind="tensor", nbytes=n, dtype="uint8",
                                      shape=[n]),
                            lambda start, v=view: (v[o:o + chunk_bytes] for o in range(start, len(v), chunk_bytes)),
                            gen=gen))
        nbytes -= n
        i += 1
    return out
