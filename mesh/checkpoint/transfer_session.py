"""The transfer channel's receiving session: what one session (a migration's, a checkpoint's) has received,
entry by entry (`ReceiveSession`: begin, chunk, end, commit; `_RecvEntry`), within its limits, and the
refusals of what a sender got wrong (`_Abort`, a status and a message). Its streams arrive through
mesh/checkpoint/transfer_stream.py; the server is mesh/checkpoint/transfer_recv.py. See
mesh/checkpoint/transfer.py for the protocol."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import grpc

from mesh.checkpoint.format import DEFAULT_CHECKSUM, EntryMeta, FormatError, Manifest, chunk_sum, new_hasher
from mesh.checkpoint.transfer_auth import check_secret
from mesh.checkpoint.transfer_sinks import BufferTarget, EntryTarget, Sink
from mesh.checkpoint.transfer_wire import cumulative_sum


MAX_DATA_ENTRY = 64 << 20
"""data entries (step, extras, RNG, optimizer hyper-parameters) are small and held in memory."""
MAX_SESSION_DATA = 4 * MAX_DATA_ENTRY
"""all the data entries one session holds in memory together: each `begin` of a data entry allocates its
bytes at once, so without this bound a sender's small frames could make the receiver (the agent) allocate
without end."""
MAX_SESSION_ENTRIES = 1 << 16
"""entries (of any kind) one session holds: a checkpoint's tensors and data entries are thousands at most."""


class _Abort(Exception):
    """What a sender got wrong: the stream is answered `code` with `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        self.last_frame = 0.0
        """`time.monotonic()` when a stream of this session last delivered a frame (its hello included); 0.0:
        none yet. With `streams`, how the session's owner tells a push in progress from a sender that never
        pushed (nodeagent/migrate_checkpoint.py `call_unless_stalled`)."""
        self.streams = 0            # the streams of this session open now (one at a time: the lock)

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
