"""Hostile input on the transfer receiver (a real TransferServer over gRPC): a hello recorded off the
wire and replayed, frames a secret-holding sender malformed (empty, shorter than their header, numbers
JSON spells as Infinity, a step or size past int64), a commit whose manifest does not describe what
arrived. Each is a clean refusal with a status that names it, and nothing of it reaches the sink's
checkpoint directory."""

from __future__ import annotations

import threading

import grpc
import pytest

from mesh.checkpoint.format import EntryMeta, Manifest, checksum
from mesh.checkpoint.transfer import PUSH, DirectorySink, TransferServer, frame, unframe
from mesh.checkpoint.transfer_auth import client_channel, client_hello

SECRET = bytes(range(32))
BLOB = bytes(range(256)) * 8


@pytest.fixture
def server():
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


def push(address: str, session: str, frames, secret: bytes = SECRET, hello=None):
    """One stream: the hello (recorded one when given), then `frames(channel)` sealed by the stream's
    channel. Returns the opened answers after the `have`; raises grpc.RpcError when refused."""
    hello, nonce = hello or client_hello(secret, session)
    ready, box = threading.Event(), {}

    def requests():
        yield frame(hello)
        ready.wait(10)
        for f in frames(box["ch"]) if "ch" in box else ():
            yield box["ch"].seal(f)
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(PUSH)(requests(), timeout=20)
        try:
            box["ch"], _ = client_channel(secret, session, nonce, next(call))
        finally:
            ready.set()
        return [unframe(box["ch"].open(m))[0] for m in call]


def begin(meta: dict, gen=0, offset=0) -> bytes:
    return frame({"t": "begin", "meta": meta, "gen": gen, "offset": offset, "algo": "sha256"})


def tensor(name: str = "a", blob: bytes = BLOB) -> dict:
    return {"name": name, "kind": "tensor", "nbytes": len(blob), "dtype": "uint8", "shape": [len(blob)]}


def commit(entries: list[dict], step=1) -> bytes:
    return frame({"t": "commit", "manifest": Manifest(workload_id="w", step=0, checksum="sha256", entries=[
        EntryMeta.from_json(e) for e in entries]).to_json() | {"step": step}})


def whole(name: str = "a", blob: bytes = BLOB) -> list[bytes]:
    """begin, one chunk (CRC-32 checked) and end of a tensor entry."""
    import zlib
    return [begin(tensor(name, blob)), frame({"t": "chunk", "offset": 0, "sum": zlib.crc32(blob)}, blob),
            frame({"t": "end", "checksum": checksum(blob, "sha256")})]


# --- replay ----------------------------------------------------------------------------------

def test_a_replayed_hello_is_refused(server, tmp_path):
    """The hello's proof covers only the sender's nonce: replayed by someone on the wire (no secret), it
    used to be answered and its stream took the session's lock, holding off every later stream of the
    real sender (a reconnect, the next pre-copy round) for as long as the replayer kept it open."""
    sink = DirectorySink(str(tmp_path / "ck"), "w")
    server.expect("mig-1", sink, secret=SECRET)
    recorded = client_hello(SECRET, "mig-1")
    push(server.address, "mig-1", lambda ch: [], hello=recorded)          # the real sender's stream
    with pytest.raises(grpc.RpcError) as exc:
        push(server.address, "mig-1", lambda ch: [], hello=recorded)      # the same hello again
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed" in exc.value.details()
    # a fresh hello of the real sender is still heard, and commits
    done = push(server.address, "mig-1", lambda ch: whole() + [commit([tensor() | {
        "checksum": checksum(BLOB, "sha256")}])])
    assert done[-1]["committed"] == {"path": str(tmp_path / "ck")}


# --- malformed frames from a sender that holds the secret ----------------------------------------

@pytest.mark.parametrize("bad", [
    pytest.param(lambda: b"", id="empty frame"),
    pytest.param(lambda: b"\x01\x00", id="frame shorter than its header length"),
    pytest.param(lambda: begin(tensor(), gen=float("inf")), id="infinite generation"),
    pytest.param(lambda: begin(tensor() | {"nbytes": float("inf")}), id="infinite nbytes"),
    pytest.param(lambda: begin(tensor() | {"shape": [float("inf")]}), id="infinite shape"),
])
def test_a_malformed_frame_is_a_clean_invalid_argument(server, tmp_path, bad):
    sink = DirectorySink(str(tmp_path / "ck"), "w")
    server.expect("s", sink, secret=SECRET)
    with pytest.raises(grpc.RpcError) as exc:
        push(server.address, "s", lambda ch: [bad()])
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert not (tmp_path / "ck").exists()

@pytest.mark.parametrize("field,value", [("step", 2 ** 64), ("step", -1), ("nbytes", 2 ** 63)])
def test_numbers_outside_int64_are_refused_before_anything_is_committed(server, tmp_path, field, value):
    """A step or size past int64 was committed into the checkpoint directory; the agent's answer (a
    MigrationReport of int64 fields) then failed, so the store kept a checkpoint no record names."""
    sink = DirectorySink(str(tmp_path / "ck"), "w")
    server.expect("s", sink, secret=SECRET)
    if field == "step":
        frames = whole() + [commit([tensor() | {"checksum": checksum(BLOB, "sha256")}], step=value)]
    else:
        frames = [begin(tensor() | {"nbytes": value})]
    with pytest.raises(grpc.RpcError) as exc:
        push(server.address, "s", lambda ch: frames)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert field in exc.value.details()
    assert not (tmp_path / "ck").exists()


# --- a commit that does not describe what arrived ------------------------------------------------

A = tensor() | {"checksum": checksum(BLOB, "sha256")}


@pytest.mark.parametrize("entries", [
    pytest.param([A | {"kind": "data", "dtype": "", "shape": []}], id="a tensor called data"),
    pytest.param([A | {"nbytes": 10 * len(BLOB), "shape": [10 * len(BLOB)]}], id="another size"),
    pytest.param([A | {"dtype": "float32", "shape": [len(BLOB) // 4]}], id="another dtype and shape"),
    pytest.param([A, A], id="the entry twice"),
])
def test_a_commit_must_describe_the_entries_that_arrived(server, tmp_path, entries):
    """The commit's manifest is what the store keeps and what a restore sends: it used to be checked only for
    each entry's checksum. Into the agent's store (StoreSink) a received tensor the manifest calls a data
    entry was overwritten by an empty data file, and the checkpoint was answered CHECKPOINTED: complete in
    the store, and never restorable."""
    from mesh.checkpoint.store import StoreSink
    sink = StoreSink(str(tmp_path / "ck"), "w", key=bytes(32), tenant="t", checkpoint_id="ck")
    server.expect("s", sink, secret=SECRET)
    with pytest.raises(grpc.RpcError) as exc:
        push(server.address, "s", lambda ch: whole() + [commit(entries)])
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value.details()
    assert "'a'" in exc.value.details()
    assert not (tmp_path / "ck").exists()
