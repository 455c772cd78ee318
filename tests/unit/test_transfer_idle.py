"""Liveness of the transfer receiver (a real TransferServer over gRPC): a sender that stops sending without
closing its stream (its host froze, its cable was pulled: no FIN, no RST) is given up after the idle timeout
between frames, answered DEADLINE_EXCEEDED, and the session's lock is released, so the sender's retry goes
through; both ends keep the connection alive with gRPC keepalive pings, which the other end accepts."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from mesh.checkpoint import transfer_recv
from mesh.checkpoint.format import EntryMeta, Manifest, verify_checkpoint
from mesh.checkpoint.transfer import PUSH, DirectorySink, OutEntry, TransferClient, TransferServer, frame
from mesh.checkpoint.transfer_auth import client_channel, client_hello

SECRET = bytes(range(32))
BLOB = bytes(range(256)) * 16
META = EntryMeta(name="a", kind="tensor", nbytes=len(BLOB), dtype="uint8", shape=[len(BLOB)])
GUARD_S = 30.0       # how long the test waits for the receiver to give up (an old receiver never does)


def _wait_for(cond, deadline_s: float = GUARD_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _stalled_push(address: str, session: str, stall: threading.Event):
    """A stream that sends its hello and one frame (the begin of an entry), then nothing, without closing,
    until `stall` is set. Returns (channel, call)."""
    hello, nonce = client_hello(SECRET, session)
    ready, box = threading.Event(), {}

    def requests():
        yield frame(hello)
        ready.wait(GUARD_S)
        yield box["ch"].seal(frame({"t": "begin", "meta": META.to_json(), "gen": 0, "offset": 0, "algo": "sha256"}))
        stall.wait()        # the sender's host froze: no frame, no close
    channel = grpc.insecure_channel(address)
    call = channel.stream_stream(PUSH)(requests())      # no deadline of its own: the receiver must end it
    try:
        box["ch"], _ = client_channel(SECRET, session, nonce, next(call))
    finally:
        ready.set()
    return channel, call


def _send_whole(address: str, session: str):
    with TransferClient(address, session, secret=SECRET, chunk_bytes=1024, mesh="grpc") as c:
        return c.send([OutEntry(META, lambda start: (memoryview(BLOB)[o:o + 1024]
                                                      for o in range(start, len(BLOB), 1024)))],
                      commit=lambda st: Manifest(workload_id="w", step=3, checksum=c.algo, entries=[
                          EntryMeta(**{**META.to_json(), "checksum": st.checksums["a"]})]))


def test_a_sender_that_stops_sending_is_given_up_and_its_retry_goes_through(tmp_path, monkeypatch):
    """Before: the receiver waited for the stalled stream's next frame for as long as gRPC kept the dead
    connection (hours without keepalive), holding the session's lock: the sender's retry after it came
    back waited behind it, and the migration's transfer with it."""
    monkeypatch.setattr(transfer_recv, "IDLE_TIMEOUT_S", 1.0, raising=False)
    server = TransferServer("127.0.0.1:0").start()
    stall = threading.Event()
    channel = None
    try:
        sink = DirectorySink(str(tmp_path / "ck"), "w")
        session = server.expect("mig-1", sink, secret=SECRET)
        channel, call = _stalled_push(server.address, "mig-1", stall)
        assert _wait_for(call.done), "the receiver gave up the stream that sends nothing"
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no frame for 1 s" in call.details() and "idle timeout" in call.details()
        assert session.lock.acquire(timeout=GUARD_S), "the session's lock was released"
        session.lock.release()
        # the retry, while the stalled stream is still open on the sender's side (it never closed it)
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(stats=_send_whole(server.address, "mig-1")), daemon=True)
        t.start()
        t.join(GUARD_S)
        assert not t.is_alive() and box["stats"].committed is not None
        verify_checkpoint(str(tmp_path / "ck"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no partial directory left"
    finally:
        stall.set()
        if channel is not None:
            channel.close()
        server.stop(0)


def test_a_slow_sender_within_the_idle_timeout_is_not_given_up(tmp_path, monkeypatch):
    """The limit is between frames, not on the whole stream: a sender whose stream lasts longer than the
    idle timeout, each frame well within it, arrives in one attempt."""
    monkeypatch.setattr(transfer_recv, "IDLE_TIMEOUT_S", 3.0)
    server = TransferServer("127.0.0.1:0").start()
    try:
        server.expect("mig-2", DirectorySink(str(tmp_path / "ck"), "w"), secret=SECRET)

        def chunks(start):
            for o in range(start, len(BLOB), 256):      # 16 chunks, 4 s together
                time.sleep(0.25)
                yield memoryview(BLOB)[o:o + 256]
        with TransferClient(server.address, "mig-2", secret=SECRET, chunk_bytes=256, mesh="grpc",
                            retries=0) as c:
            stats = c.send([OutEntry(META, chunks)], commit=lambda st: Manifest(
                workload_id="w", step=3, checksum=c.algo,
                entries=[EntryMeta(**{**META.to_json(), "checksum": st.checksums["a"]})]))
        assert stats.committed is not None and stats.attempts == 1
    finally:
        server.stop(0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "60", True])
def test_the_idle_timeout_is_validated(bad):
    with pytest.raises(ValueError, match="idle_timeout_s"):
        TransferServer("127.0.0.1:0", idle_timeout_s=bad)


def test_keepalive_pings_of_either_end_are_accepted_by_the_other():
    """A client pinging more often than the server accepts is sent GOAWAY (too_many_pings) and its
    transfer cut: the server's floor must be below the client's interval, and both ends ping during a
    stalled stream (no data), so neither caps the pings sent without data."""
    from mesh.checkpoint.transfer_wire import CHANNEL_OPTIONS, SERVER_OPTIONS
    client, server = dict(CHANNEL_OPTIONS), dict(SERVER_OPTIONS)
    assert client["grpc.keepalive_time_ms"] > 0 and server["grpc.keepalive_time_ms"] > 0
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.http2.max_pings_without_data"] == 0 == server["grpc.http2.max_pings_without_data"]
    assert server["grpc.keepalive_permit_without_calls"] == 1


@pytest.mark.parametrize("bad, said", [(0.5, "below the minimum"), (7200, "above the maximum"),
                                       (float("nan"), "a finite number is needed")])
def test_the_agents_idle_timeout_is_validated(bad, said):
    from mesh.config import ConfigError, validate
    from nodeagent.config import AgentConfig
    assert AgentConfig().transfer_idle_timeout_seconds == transfer_recv.IDLE_TIMEOUT_S
    with pytest.raises(ConfigError, match=f"transfer_idle_timeout_seconds: .*{said}"):
        validate(AgentConfig(gpu_backend="sim", sim_host_file=["x.yaml"], insecure=True,
                             transfer_idle_timeout_seconds=bad))
