"""Attacks on the transfer channel (a real TransferServer over gRPC): pushes without the session's
secret, with another session's secret, with a chunk altered on the way, and with a crafted pickle
payload are each refused before anything is written, and nothing they carry is executed.
mTLS: only a peer with an agent certificate of the cluster's CA (and the expected name) is heard."""

from __future__ import annotations

import pickle
from pathlib import Path

import grpc
import pytest

from mesh.checkpoint.format import EntryMeta, Manifest
from mesh.checkpoint.transfer import (PUSH, BufferTarget, DirectorySink, OutEntry, SendStats, TransferClient,
                                      TransferError, TransferServer, frame, unframe)
from mesh.checkpoint.transfer_auth import TransferAuthError, client_channel, client_hello

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
CHUNK = 1000
BLOB = bytes(range(256)) * 20


class Sink:
    def __init__(self) -> None:
        self.buf = bytearray(len(BLOB))
        self.opened: list[str] = []
        self.committed = None

    def open_entry(self, meta: EntryMeta) -> BufferTarget:
        self.opened.append(meta.name)
        return BufferTarget(memoryview(self.buf))

    def commit(self, manifest: Manifest, data: dict) -> dict:
        self.committed = manifest
        return {"ok": 1}


def entries(blob: bytes = BLOB, name: str = "a") -> list[OutEntry]:
    return [OutEntry(EntryMeta(name=name, kind="tensor", nbytes=len(blob), dtype="uint8", shape=[len(blob)]),
                     lambda start: (memoryview(blob)[o:o + CHUNK] for o in range(start, len(blob), CHUNK)))]


def manifest(stats: SendStats, blob: bytes = BLOB) -> Manifest:
    return Manifest(workload_id="w", step=1, entries=[EntryMeta(
        name="a", kind="tensor", nbytes=len(blob), dtype="uint8", shape=[len(blob)], checksum=stats.checksums["a"])])


@pytest.fixture
def server():
    s = TransferServer("127.0.0.1:0").start()
    yield s
    s.stop(0)


def test_the_owner_of_the_secret_gets_through(server):
    sink = Sink()
    server.expect("m-1", sink, secret=SECRET)
    with TransferClient(server.address, "m-1", secret=SECRET, chunk_bytes=CHUNK) as c:
        stats = c.send(entries(), commit=manifest)
    assert stats.committed == {"ok": 1} and bytes(sink.buf) == BLOB


def _raw_push(address: str, messages: list[bytes]) -> list[bytes]:
    with grpc.insecure_channel(address) as ch:
        return list(ch.stream_stream(PUSH)(iter(messages), timeout=10))


def test_a_push_without_the_secret_is_refused_before_anything_is_written(server, tmp_path):
    sink = DirectorySink(str(tmp_path / "ck"), "w")
    server.expect("mig-m-1", sink, secret=SECRET)
    # what the old protocol sent: the session name (which viewers could read) and then the data
    msgs = [frame({"t": "hello", "session": "mig-m-1"}),
            frame({"t": "begin", "meta": entries()[0].meta.to_json(), "gen": 0, "offset": 0, "algo": "sha256"}),
            frame({"t": "chunk", "offset": 0, "sum": -1}, BLOB)]
    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(server.address, msgs)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "proof" in exc.value.details()
    assert sink.files == {} and list((sink.writer.tmp / "data").iterdir()) == []
    assert not (tmp_path / "ck").exists()


def test_a_push_with_another_migrations_secret_is_refused(server):
    mine, theirs = Sink(), Sink()
    server.expect("mig-m-1", mine, secret=SECRET)
    server.expect("mig-m-2", theirs, secret=OTHER)
    with TransferClient(server.address, "mig-m-1", secret=OTHER, chunk_bytes=CHUNK, retries=3) as c:
        with pytest.raises(TransferError, match="UNAUTHENTICATED.*does not match") as exc:
            c.send(entries(), commit=manifest)
    assert "after 1 attempts" in str(exc.value)         # refused for good, not retried
    assert mine.opened == [] and mine.committed is None and bytes(mine.buf) == bytes(len(BLOB))


def test_a_receiver_that_does_not_know_the_secret_gets_nothing(server):
    """The sender checks the receiver too: an impostor listening on the address cannot open the stream."""
    impostor = Sink()
    server.expect("mig-m-1", impostor, secret=OTHER)
    with TransferClient(server.address, "mig-m-1", secret=SECRET, chunk_bytes=CHUNK) as c:
        with pytest.raises(TransferError):
            c.send(entries(), commit=manifest)
    assert impostor.opened == [] and impostor.committed is None


class _Tamper:
    """A man in the middle: forwards the pushes to `upstream`, flipping one byte of every message
    from `index` on (it cannot reseal them without the secret)."""

    def __init__(self, upstream: str, index: int) -> None:
        self.upstream, self.index = grpc.insecure_channel(upstream), index
        self.server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "gpumesh.checkpoint.v1.Transfer", {"Push": grpc.stream_stream_rpc_method_handler(self._push)}),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _push(self, requests, context):
        def altered():
            for i, m in enumerate(requests):
                if i >= self.index and len(m) > 100:
                    m = bytearray(m)
                    m[len(m) // 2] ^= 0x01
                    m = bytes(m)
                yield m
        try:
            yield from self.upstream.stream_stream(PUSH)(altered())
        except grpc.RpcError as e:
            context.abort(e.code(), e.details())

    def stop(self) -> None:
        self.server.stop(0)
        self.upstream.close()


def test_a_chunk_altered_on_the_way_is_refused_and_not_written(server):
    sink = Sink()
    server.expect("mig-m-1", sink, secret=SECRET)
    proxy = _Tamper(server.address, index=2)     # hello, begin, then the chunks
    try:
        with TransferClient(proxy.address, "mig-m-1", secret=SECRET, chunk_bytes=CHUNK, retries=2) as c:
            with pytest.raises(TransferError, match="DATA_LOSS.*failed authentication"):
                c.send(entries(), commit=manifest)
    finally:
        proxy.stop()
    assert sink.committed is None and bytes(sink.buf) == bytes(len(BLOB))


def test_the_same_stream_through_an_honest_relay_commits(server):
    sink = Sink()
    server.expect("mig-m-1", sink, secret=SECRET)
    proxy = _Tamper(server.address, index=10 ** 6)
    try:
        with TransferClient(proxy.address, "mig-m-1", secret=SECRET, chunk_bytes=CHUNK) as c:
            assert c.send(entries(), commit=manifest).committed == {"ok": 1}
    finally:
        proxy.stop()
    assert bytes(sink.buf) == BLOB


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _push_entry(address: str, secret: bytes, name: str, kind: str, blob: bytes) -> None:
    meta = EntryMeta(name=name, kind=kind, nbytes=len(blob))
    with TransferClient(address, "restore", secret=secret, retries=0) as c:
        c.send([OutEntry(meta, lambda start: [memoryview(blob)[start:]])], commit=lambda st: Manifest(
            workload_id="w", step=7, entries=[EntryMeta(name=name, kind=kind, nbytes=len(blob),
                                                        checksum=st.checksums[name])]))


def test_a_crafted_pickle_payload_is_never_unpickled(server, tmp_path):
    """Even a sender that holds the secret (a compromised peer) cannot make the receiver run code:
    an entry of kind "pickle" is refused at `begin`, and a data entry holding pickle bytes is
    refused by the JSON reader. The receiving workload's state is untouched."""
    torch = pytest.importorskip("torch")
    from mesh.checkpoint.sdk import StateSink
    from mesh.checkpoint.state import WorkloadState
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"step": 99, "extras": _Payload(marker)})
    state = WorkloadState("w")
    state.register_tensor("t", torch.zeros(4))
    server.expect("restore", StateSink(state), secret=SECRET)
    with pytest.raises(TransferError, match="INVALID_ARGUMENT.*kind 'pickle' is not allowed"):
        _push_entry(server.address, SECRET, "meta", "pickle", blob)
    with pytest.raises(TransferError, match="not a tagged JSON data entry"):
        _push_entry(server.address, SECRET, "meta", "data", blob)
    assert not marker.exists(), "the payload ran"
    assert state.step == 0 and state.extras == {}
    # and without the secret it does not even get to `begin`
    with pytest.raises(TransferError, match="UNAUTHENTICATED"):
        _push_entry(server.address, OTHER, "meta", "pickle", blob)
    assert not marker.exists()


def test_pickled_checkpoints_on_disk_are_refused(tmp_path):
    """A checkpoint directory of the old format (pickle entries) is not loaded."""
    torch = pytest.importorskip("torch")
    import json
    from mesh.checkpoint.format import FormatError
    from mesh.checkpoint.state import WorkloadState
    st = WorkloadState("w")
    st.register_tensor("t", torch.zeros(4))
    st.save(str(tmp_path / "ck"))
    doc = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / "data" / "99999.bin").write_bytes(pickle.dumps(_Payload(marker)))
    doc["entries"].append({"name": "meta", "kind": "pickle", "nbytes": 1, "file": "data/99999.bin"})
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="kind 'pickle' is not allowed"):
        WorkloadState("w").load(str(tmp_path / "ck"))
    assert not marker.exists()


def test_the_handshake_cannot_be_replayed(server):
    """A recorded hello (with a valid proof) replayed by someone without the secret gets an answer it
    cannot open, and frames it cannot seal."""
    sink = Sink()
    server.expect("mig-m-1", sink, secret=SECRET)
    hello, nonce = client_hello(SECRET, "mig-m-1")        # recorded off the wire
    begin = frame({"t": "begin", "meta": entries()[0].meta.to_json(), "gen": 0, "offset": 0, "algo": "sha256"})
    with pytest.raises(grpc.RpcError) as exc:
        answers = _raw_push(server.address, [frame(hello), begin])
    assert exc.value.code() == grpc.StatusCode.DATA_LOSS and "failed authentication" in exc.value.details()
    assert sink.opened == []
    hello, nonce = client_hello(SECRET, "mig-m-1")        # another one: a replayed hello is refused at once
    with pytest.raises(TransferAuthError):
        answers = [m for m in _raw_push(server.address, [frame(hello)])]
        client_channel(OTHER, "mig-m-1", nonce, answers[0])


# --- mTLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from mesh import tls
    d = tmp_path_factory.mktemp("tls")
    tls.write_ca(d)
    for node in ("node-a", "node-b"):
        tls.issue(d, "agent", node)
    other = d / "other"
    tls.write_ca(other)
    tls.issue(other, "agent", "node-a")
    return d


def _tls_server(certs: Path, peer: str) -> tuple[TransferServer, Sink]:
    from mesh import tls
    creds = tls.server_credentials(str(certs / "node-b.crt"), str(certs / "node-b.key"), client_ca=str(
        certs / "ca.crt"), require_client_auth=True)
    s = TransferServer("127.0.0.1:0", credentials=creds).start()
    sink = Sink()
    s.expect("mig-m-1", sink, secret=SECRET, peer=peer)
    return s, sink


def test_agents_transfer_over_mtls(certs):
    from mesh import tls
    s, sink = _tls_server(certs, peer="node-a")
    try:
        creds = tls.channel_credentials(str(certs / "ca.crt"), str(certs / "node-a.crt"), str(certs / "node-a.key"))
        with TransferClient(s.address, "mig-m-1", secret=SECRET, credentials=creds, server_name="node-b",
                            chunk_bytes=CHUNK) as c:
            assert c.send(entries(), commit=manifest).committed == {"ok": 1}
    finally:
        s.stop(0)
    assert bytes(sink.buf) == BLOB


@pytest.mark.parametrize("who", ["plaintext", "no-cert", "other-ca", "other-node"])
def test_mtls_refuses_peers_that_are_not_the_source_agent(certs, who):
    from mesh import tls
    s, sink = _tls_server(certs, peer="node-a")
    try:
        kw: dict = {}
        if who == "no-cert":
            kw = {"credentials": tls.channel_credentials(str(certs / "ca.crt")), "server_name": "node-b"}
        elif who == "other-ca":
            o = certs / "other"
            kw = {"credentials": tls.channel_credentials(str(certs / "ca.crt"), str(o / "node-a.crt"),
                                                         str(o / "node-a.key")), "server_name": "node-b"}
        elif who == "other-node":
            kw = {"credentials": tls.channel_credentials(str(certs / "ca.crt"), str(certs / "node-b.crt"),
                                                         str(certs / "node-b.key")), "server_name": "node-b"}
        with TransferClient(s.address, "mig-m-1", secret=SECRET, chunk_bytes=CHUNK, retries=0,
                            connect_timeout=3, **kw) as c:
            with pytest.raises(TransferError):
                c.send(entries(), commit=manifest)
    finally:
        s.stop(0)
    assert sink.opened == [] and sink.committed is None
