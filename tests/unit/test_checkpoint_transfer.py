"""The transfer channel: chunked, checked, resumable after a cut stream; sinks."""

from __future__ import annotations

import threading

import grpc
import pytest

from mesh.checkpoint.format import EntryMeta, Manifest, read_entry, read_manifest, verify_checkpoint
from mesh.checkpoint.transfer import (BufferTarget, DirectorySink, OutEntry, ReceiveSession, SendStats, TransferClient,
                                      TransferError, TransferServer, _Abort)

CHUNK = 1000

SECRET = bytes(range(32))



class MemorySink:
    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}
        self.opened: list[str] = []
        self.committed: Manifest | None = None

    def open_entry(self, meta: EntryMeta) -> BufferTarget:
        self.opened.append(meta.name)
        self.buffers[meta.name] = buf = bytearray(meta.nbytes)
        return BufferTarget(memoryview(buf))

    def commit(self, manifest: Manifest, data: dict[str, bytes]) -> dict:
        self.committed = manifest
        self.data = data
        return {"ok": 1}


def entries(blobs: dict[str, bytes], gen: int = 0) -> list[OutEntry]:
    return [OutEntry(EntryMeta(name=n, kind="tensor", nbytes=len(b), dtype="uint8", shape=[len(b)]),
                     lambda start, b=b: (memoryview(b)[o:o + CHUNK] for o in range(start, len(b), CHUNK)), gen=gen)
            for n, b in blobs.items()]


def manifest_of(blobs: dict[str, bytes], stats: SendStats) -> Manifest:
    return Manifest(workload_id="w", step=3, entries=[
        EntryMeta(name=n, kind="tensor", nbytes=len(b), dtype="uint8", shape=[len(b)], checksum=stats.checksums[n])
        for n, b in blobs.items()])


@pytest.fixture
def server():
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


BLOBS = {"a": bytes(range(256)) * 40, "b": b"\x07" * 4321, "empty": b""}


def test_chunked_send_and_commit(server):
    sink = MemorySink()
    session = server.expect("s1", sink, secret=SECRET)
    seen = []
    with TransferClient(server.address, "s1", chunk_bytes=CHUNK, progress=lambda n, t, s: seen.append((n, t)), secret=SECRET) as c:
        stats = c.send(entries(BLOBS), commit=lambda st: manifest_of(BLOBS, st))
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BLOBS
    assert stats.bytes == sum(map(len, BLOBS.values())) and stats.entries == 3 and stats.attempts == 1
    assert stats.committed == {"ok": 1} and sink.committed.step == 3
    assert len(seen) == 11 + 5  # one progress call per chunk of 1000 bytes
    assert session.committed_event.is_set()


class GatedSink(MemorySink):
    """Sets `took_a` once the receiver has written a chunk of entry "a" (the sender cuts the stream only then:
    cut_gate; without it, a cut before the receiver's pipeline wrote anything of "a" restarted the entry, rightly,
    and the test failed on a loaded machine)."""

    def __init__(self) -> None:
        super().__init__()
        self.took_a = threading.Event()

    def open_entry(self, meta: EntryMeta) -> BufferTarget:
        target = super().open_entry(meta)
        if meta.name != "a":
            return target
        took, write = self.took_a, target.write

        def noted(offset: int, data: memoryview) -> None:
            write(offset, data)
            took.set()
        target.write = noted
        return target


def test_resumes_after_a_cut_stream(server):
    sink = GatedSink()
    session = server.expect("s2", sink, secret=SECRET)
    with TransferClient(server.address, "s2", chunk_bytes=CHUNK, secret=SECRET) as c:
        c.cut_after_bytes = 5000  # cancel the stream in the middle of entry "a"
        c.cut_gate = sink.took_a  # ... once the receiver has written some of it
        stats = c.send(entries(BLOBS), commit=lambda st: manifest_of(BLOBS, st))
    assert stats.attempts == 2
    assert {n: bytes(b) for n, b in sink.buffers.items()} == BLOBS
    assert sink.opened.count("a") == 1, "entry a was continued where the receiver stood, not restarted"
    # the resend is at most what went out before the cut (how much of it the receiver had taken
    # by then depends on gRPC's buffering); restarting entry "a" would resend all 10240 bytes
    assert stats.bytes <= sum(map(len, BLOBS.values())) + 5000
    assert session.bytes_received == sum(map(len, BLOBS.values()))
    assert sink.committed is not None


def test_newer_generation_replaces_and_same_generation_is_skipped(server):
    sink = MemorySink()
    server.expect("s3", sink, secret=SECRET)
    with TransferClient(server.address, "s3", chunk_bytes=CHUNK, secret=SECRET) as c:
        c.send(entries(BLOBS, gen=0))
        again = c.send(entries(BLOBS, gen=0))
        assert again.bytes == 0 and again.skipped == 3
        changed = {"b": b"\x09" * 4321}
        st = c.send(entries(changed, gen=1))
    assert st.bytes == 4321 and bytes(sink.buffers["b"]) == changed["b"]


def test_corrupt_chunk_and_entry_are_refused_and_named():
    sink = MemorySink()
    s = ReceiveSession("x", sink, secret=SECRET)
    meta = EntryMeta(name="module/m/w", kind="tensor", nbytes=4, dtype="uint8", shape=[4])
    e = s.begin(meta, gen=0, offset=0, algo="sha256")
    import zlib
    with pytest.raises(_Abort) as exc:
        s.chunk(e, {"offset": 0, "sum": zlib.crc32(b"abcd") ^ 1}, memoryview(b"abcd"))
    assert exc.value.code == grpc.StatusCode.DATA_LOSS and "'module/m/w'" in exc.value.message
    assert e.offset == 0
    s.chunk(e, {"offset": 0, "sum": zlib.crc32(b"abcd")}, memoryview(b"abcd"))
    with pytest.raises(_Abort, match="'module/m/w': sha256 mismatch"):
        s.end(e, "0" * 64)
    assert "module/m/w" not in s.entries  # reset: it will be sent again from its start
    with pytest.raises(_Abort, match="'module/m/w' has not arrived whole"):
        s.commit(Manifest("w", 0, [meta]))


def test_cumulative_chunk_check_refuses_a_corrupt_chunk_and_takes_it_again():
    """The sender's per-chunk check is 64 bits of the running digest (one pass over the bytes);
    a corrupt chunk is refused without spoiling the receiver's running digest."""
    from mesh.checkpoint.format import DEFAULT_CHECKSUM, new_hasher
    from mesh.checkpoint.transfer_wire import cumulative_sum
    s = ReceiveSession("x", MemorySink(), secret=SECRET)
    meta = EntryMeta(name="module/m/w", kind="tensor", nbytes=8, dtype="uint8", shape=[8])
    e = s.begin(meta, gen=0, offset=0, algo=DEFAULT_CHECKSUM, check="cumulative")
    h = new_hasher(DEFAULT_CHECKSUM)
    h.update(b"abcd")
    s.chunk(e, {"offset": 0, "sum": cumulative_sum(h)}, memoryview(b"abcd"))
    h.update(b"efgh")
    with pytest.raises(_Abort) as exc:
        s.chunk(e, {"offset": 4, "sum": cumulative_sum(h)}, memoryview(b"efgX"))     # corrupted on the way
    assert exc.value.code == grpc.StatusCode.DATA_LOSS and e.offset == 4
    s.chunk(e, {"offset": 4, "sum": cumulative_sum(h)}, memoryview(b"efgh"))         # the resend
    s.end(e, h.hexdigest())
    assert e.done and e.checksum == h.hexdigest()


def test_unknown_session_fails_without_retrying(server):
    with TransferClient(server.address, "nope", retries=3, secret=SECRET) as c:
        with pytest.raises(TransferError, match="no transfer session 'nope'") as exc:
            c.send(entries(BLOBS))
    assert "after 1 attempts" in str(exc.value)


def test_unchecked_chunks_need_the_sessions_consent(server):
    server.expect("strict", MemorySink(), secret=SECRET)
    with TransferClient(server.address, "strict", verify=False, retries=0, secret=SECRET) as c:
        with pytest.raises(TransferError, match="takes only checked chunks"):
            c.send(entries(BLOBS))


def test_directory_sink_writes_a_verifiable_checkpoint(server, tmp_path):
    server.expect("d", DirectorySink(str(tmp_path / "store" / "ck"), "w"), secret=SECRET)
    with TransferClient(server.address, "d", chunk_bytes=CHUNK, secret=SECRET) as c:
        c.send(entries(BLOBS, gen=0))
        c.send(entries({"b": b"\x01" * 4321}, gen=1))  # a later round rewrites b
        final = {**BLOBS, "b": b"\x01" * 4321}
        stats = c.send([], commit=lambda st: manifest_of(final, SendStats(checksums={
            n: _checksum(b) for n, b in final.items()})))
    assert stats.committed == {"path": str(tmp_path / "store" / "ck")}
    m = verify_checkpoint(tmp_path / "store" / "ck")
    assert {e.name: read_entry(tmp_path / "store" / "ck", m, e.name) for e in m.entries} == final
    assert read_manifest(tmp_path / "store" / "ck").step == 3


def _checksum(b: bytes) -> str:
    from mesh.checkpoint.format import checksum
    return checksum(b)


def test_unreachable_endpoint_is_reported():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with TransferClient(f"127.0.0.1:{port}", "x", connect_timeout=0.5, secret=SECRET) as c:
        with pytest.raises(TransferError, match="cannot reach the transfer endpoint"):
            c.send(entries(BLOBS))


def test_data_entries_a_session_holds_are_bounded(monkeypatch):
    """Each `begin` of a data entry allocates its bytes at once: past the session's bound (bytes and
    entries) a begin is refused before anything is allocated, and a replaced entry's buffer is released."""
    from mesh.checkpoint import transfer_session
    monkeypatch.setattr(transfer_session, "MAX_DATA_ENTRY", 400)
    monkeypatch.setattr(transfer_session, "MAX_SESSION_DATA", 1000)
    monkeypatch.setattr(transfer_session, "MAX_SESSION_ENTRIES", 5)
    s = ReceiveSession("x", MemorySink(), secret=SECRET)

    def data(name: str, n: int, gen: int = 0):
        return s.begin(EntryMeta(name=name, kind="data", nbytes=n), gen=gen, offset=0, algo="sha256")

    data("a", 400)
    data("b", 400)
    with pytest.raises(_Abort) as exc:
        data("c", 400)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1000 bytes" in exc.value.message
    assert "c" not in s.entries and s.data_bytes == 800
    old = s.entries["a"]
    data("a", 400, gen=1)           # a newer generation replaces a: its buffer is released, not added
    assert old.payload is None and s.data_bytes == 800
    data("c", 200)
    assert s.data_bytes == 1000 == sum(len(e.payload) for e in s.entries.values())
    for n in ("d", "e"):
        data(n, 0)
    with pytest.raises(_Abort, match="holds 5 entries already"):
        data("f", 0)
    with pytest.raises(_Abort, match="holds 5 entries already"):
        s.begin(EntryMeta(name="t", kind="tensor", nbytes=1, dtype="uint8", shape=[1]), gen=0, offset=0,
                algo="sha256")
    e = s.entries["c"]              # an entry that fails its checksum is dropped, its bytes with it
    with pytest.raises(_Abort, match="mismatch"):
        s.end(e, "0" * 64)
    assert s.data_bytes == 800 and e.payload is None


class _CountingServer(TransferServer):
    """Counts the Push streams a worker has taken up (the handler started)."""

    def __init__(self, *args, **kwargs) -> None:
        import threading
        self.entered = 0
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _push(self, requests, context):
        with self._count_lock:
            self.entered += 1
        yield from super()._push(requests, context)


def _idle_streams(address: str, n: int):
    """`n` Push streams that send nothing until `release` is set."""
    import threading
    from mesh.checkpoint.transfer_wire import SERVICE
    release = threading.Event()

    def nothing():
        release.wait()
        return
        yield
    channel = grpc.insecure_channel(address)
    push = channel.stream_stream(f"/{SERVICE}/Push")
    return channel, release, [push(nothing()) for _ in range(n)]


def _wait_for(cond, deadline_s: float = 30.0) -> bool:
    import time
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _push_in_thread(server, session: str):
    import threading
    sink = MemorySink()
    server.expect(session, sink, secret=SECRET)
    result: dict = {}

    def run():
        with TransferClient(server.address, session, chunk_bytes=CHUNK, retries=0, secret=SECRET) as c:
            result["stats"] = c.send(entries(BLOBS), commit=lambda st: manifest_of(BLOBS, st))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, sink, result


def test_idle_streams_do_not_block_a_real_push():
    """Streams that never send their hello (anyone who can connect) held every worker of the server
    (4 before): the session's sender waited behind them for as long as they stayed open."""
    server = _CountingServer("127.0.0.1:0").start()
    channel, release, calls = _idle_streams(server.address, 4)
    try:
        assert _wait_for(lambda: server.entered == 4), "the idle streams reached the server's handlers"
        t, sink, result = _push_in_thread(server, "real")
        t.join(30)
        assert not t.is_alive() and sink.committed is not None and result["stats"].committed == {"ok": 1}
    finally:
        release.set()
        for c in calls:
            c.cancel()
        channel.close()
        server.stop(0)


def test_a_stream_without_its_hello_is_cancelled(monkeypatch):
    """Even as many idle streams as the server has workers are ended after HELLO_TIMEOUT_S, and a
    real push then goes through."""
    from mesh.checkpoint import transfer_recv
    # short, but not so short that the real push's own hello (sent by a thread of this busy process) can miss it
    monkeypatch.setattr(transfer_recv, "HELLO_TIMEOUT_S", 2.0)
    server = _CountingServer("127.0.0.1:0", max_workers=4).start()
    channel, release, calls = _idle_streams(server.address, 4)
    try:
        assert _wait_for(lambda: server.entered == 4)
        t, sink, result = _push_in_thread(server, "real")
        assert _wait_for(lambda: all(c.done() for c in calls)), "the idle streams were ended"
        assert {c.code() for c in calls} == {grpc.StatusCode.CANCELLED}
        t.join(30)
        assert not t.is_alive() and sink.committed is not None
    finally:
        release.set()
        channel.close()
        server.stop(0)
