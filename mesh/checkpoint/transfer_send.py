"""The transfer channel's sending side: `OutEntry`, `SendStats`, `TransferClient`,
`raw_entries`. See mesh/checkpoint/transfer.py for the protocol."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh.checkpoint.format import CHUNK_BYTES, DEFAULT_CHECKSUM, CheckpointError, EntryMeta, Manifest, new_hasher
from mesh.checkpoint.transfer_auth import TransferAuthError, check_secret, client_channel, client_hello
from mesh.checkpoint.transfer_mesh import STREAM_MB_PER_S, choose
from mesh.checkpoint.transfer_wire import CHANNEL_OPTIONS, PUSH, TransferError, cumulative_sum, frame, unframe

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
    transport: str = "grpc"
    """where the chunk payloads went: "grpc" (the stream) or "shm" (the mesh; see transfer_mesh)."""
    transport_note: str = ""
    checksums: dict[str, str] = field(default_factory=dict)
    committed: dict[str, Any] | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


ProgressFn = Callable[[int, int, float], None]
"""progress(bytes_sent, bytes_total, seconds) after each chunk."""


class TransferClient:
    """Pushes entries to one session of a TransferServer, resuming after broken streams."""

    def __init__(self, target: str, session: str, *, secret: bytes, chunk_bytes: int = CHUNK_BYTES,
                 retries: int = 5, progress: ProgressFn | None = None, connect_timeout: float = 30.0,
                 verify: bool = True, mesh: str = "auto", credentials: Any = None, server_name: str = "") -> None:
        """`secret`: the session's secret (transfer_auth.py). `credentials`: grpc channel credentials
        (the agent's mTLS) or None: plaintext gRPC (the frames are sealed either way); `server_name`:
        the name to check in the receiver's certificate (an agent's: its node name)."""
        self.target = target
        self.session = session
        self.secret = check_secret(secret, f"transfer session {session!r}")
        self.chunk_bytes = chunk_bytes
        self.retries = retries
        self.progress = progress
        self.connect_timeout = connect_timeout
        self.verify = verify
        if mesh not in ("auto", "grpc", "shm"):
            raise ValueError(f"mesh: {mesh!r} (allowed: auto, grpc, shm)")
        self.mesh = mesh
        """auto: chunk payloads over the receiver's mesh buffer when it is faster; grpc: never; shm: always."""
        self._ring: Any = None
        self.stream_mb_per_s = STREAM_MB_PER_S
        self.algo = DEFAULT_CHECKSUM
        """False: no CRC or SHA-256 (raw channel measurements; the session must allow it)."""
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            opts = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
            self.channel = grpc.secure_channel(target, credentials, options=opts)
        self._push = self.channel.stream_stream(PUSH)
        self.cut_after_bytes: int | None = None
        """test hook: cancel the stream once this many bytes went out (simulates a cut connection)."""
        self.cut_gate: Any = None
        """test hook: with cut_after_bytes, an Event to wait for (30 s at most) before cancelling: the receiver
        has taken what the test needs, whatever gRPC buffered."""

    def close(self) -> None:
        self.channel.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None

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
        producers: list[tuple[threading.Event, threading.Thread]] = []

        def stop_producers() -> None:
            """A new attempt (or the end): the frames built for a dead stream are never sent, and
            its producer must not touch the ring once the next stream started."""
            for ev, _ in producers:
                ev.set()
            for _, th in producers:
                th.join(30)
            producers.clear()
        for attempt in range(self.retries + 1):
            stop_producers()
            stats.attempts = attempt + 1
            have_box: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
            cut = [False]
            hello, nonce_c = client_hello(self.secret, self.session)
            sealed: list[Any] = [None]      # this stream's Channel, once the receiver answered
            source_error: list[Any] = [None]

            def produce(held: dict[str, Any], ring: Any, stop: threading.Event) -> Iterator[tuple]:
                """The frames, hashed, built and sealed ahead of the stream (in `_prefetch`'s thread):
                ("begin", frame, name), ("chunk", frame, nbytes), ("end", frame, name, digest)."""
                frame = _sealing(sealed[0])
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
                    yield ("begin", frame({"t": "begin", "meta": e.meta.to_json(), "gen": e.gen, "offset": start,
                                           "algo": self.algo, "check": "cumulative"}), name)
                    off = start
                    for chunk in e.chunks(start):
                        if not isinstance(chunk, memoryview):
                            chunk = memoryview(chunk)
                        if self.verify:
                            hasher.update(chunk)            # the one pass over the bytes
                        csum = cumulative_sum(hasher) if self.verify else -1
                        if ring is not None and ring.fits(len(chunk)):
                            slot = ring.put(chunk, stop.is_set)
                            f = frame({"t": "chunk", "offset": off, "sum": csum, "slot": slot, "n": len(chunk)})
                        else:
                            f = frame({"t": "chunk", "offset": off, "sum": csum}, chunk)
                        off += len(chunk)
                        if self.verify:
                            boundaries[off] = hasher.copy()
                        yield ("chunk", f, len(chunk))
                    if off != e.meta.nbytes:
                        raise TransferError(f"entry {name!r}: produced {off} bytes, declared {e.meta.nbytes}", name)
                    digest = hasher.hexdigest() if self.verify else ""
                    yield ("end", frame({"t": "end", "checksum": digest}), name, digest)

            def requests() -> Iterator[bytes]:
                yield frame(hello)
                have = have_box.get()
                if have.get("_stop"):
                    return
                self._ring, use, stats.transport_note = choose(have.get("mesh"), total, self.mesh, self._ring,
                                                               self.stream_mb_per_s)
                ring = self._ring if use else None
                stats.transport = "shm" if use else "grpc"
                if ring is not None:
                    ring.restart()
                stop = threading.Event()
                try:
                    for item in _prefetch(produce(have["entries"], ring, stop), stop, PREFETCH, producers):
                        kind = item[0]
                        if kind == "begin":
                            entry_in_flight[0] = item[2]
                        yield item[1]
                        if kind == "chunk":
                            stats.bytes += item[2]
                            if self.progress:
                                self.progress(stats.bytes, total, time.perf_counter() - t0)
                            if self.cut_after_bytes is not None and stats.bytes >= self.cut_after_bytes:
                                self.cut_after_bytes = None
                                if self.cut_gate is not None:
                                    self.cut_gate.wait(30)
                                cut[0] = True
                                call.cancel()
                                return
                        elif kind == "end":
                            stats.checksums[item[2]] = item[3]
                            stats.entries += 1
                            partial.pop(item[2], None)
                except CheckpointError as exc:
                    # the source failed (a stored record that does not authenticate, a file that shrank):
                    # no commit, and no retry
                    source_error[0] = exc
                    call.cancel()
                    return
                if commit is not None:
                    manifest = commit(stats) if callable(commit) else commit
                    yield sealed[0].seal(frame({"t": "commit", "manifest": manifest.to_json()}))

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
                    raw = next(call)
                finally:
                    timer.cancel()
                try:
                    sealed[0], have_frame = client_channel(self.secret, self.session, nonce_c, raw)
                except TransferAuthError as exc:
                    have_box.put({"_stop": True})
                    call.cancel()
                    raise TransferError(f"transfer to {self.target}: {exc}") from None
                first, _ = unframe(have_frame)
                have_box.put(first)
                done = None
                for msg in call:
                    done, _ = unframe(sealed[0].open(msg))
                stats.seconds = time.perf_counter() - t0
                stats.committed = done.get("committed") if done else None
                if stats.transport == "grpc" and stats.bytes >= 64 << 20:
                    self.stream_mb_per_s = stats.mb_per_s
                return stats
            except grpc.RpcError as exc:
                if have_box.empty():
                    have_box.put({"_stop": True})
                if source_error[0] is not None:
                    stop_producers()
                    raise source_error[0]
                if unreachable[0]:
                    raise TransferError(f"cannot reach the transfer endpoint {self.target} "
                                        f"within {self.connect_timeout:g} s") from None
                code = exc.code() if hasattr(exc, "code") else None
                last_error = f"{code.name if code else 'error'}: {exc.details() if hasattr(exc, 'details') else exc}"
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and not cut[0]:
                    break
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    partial.clear()
                time.sleep(min(0.05 * (2 ** attempt), 1.0) if not cut[0] else 0)
        stop_producers()
        raise TransferError(f"transfer to {self.target} (session {self.session}) failed after "
                            f"{stats.attempts} attempts: {last_error}", entry_in_flight[0])


def _sealing(channel: Any) -> Callable[..., bytes]:
    """`frame`, sealed with the stream's channel (transfer_auth.Channel)."""
    def sealed_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
        return channel.seal(frame(header, payload))
    return sealed_frame


PREFETCH = 3
"""frames hashed and built ahead of the stream (the hashing releases the GIL: it overlaps the send)."""


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def _prefetch(items: Iterator[Any], stop: threading.Event, depth: int,
              producers: list | None = None) -> Iterator[Any]:
    """`items`, produced by a helper thread up to `depth` ahead; closing this generator (a cut
    stream) sets `stop` and waits for the helper to notice."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as exc:   # noqa: BLE001 - handed to the consumer
            put(_Raised(exc))
        finally:
            items.close() if hasattr(items, "close") else None

    t = threading.Thread(target=run, daemon=True, name="transfer-prefetch")
    t.start()
    if producers is not None:
        producers.append((stop, t))
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join(30)


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
