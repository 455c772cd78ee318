"""Attacks on the mesh data plane: the per-connection secret, TLS across hosts, and CUDA IPC descriptors.

A tenant that knows another connection's descriptor (address, rkey, endpoint, shm name: what a
viewer of that connection sees) but not its secret is refused on TCP and on shared memory; a
secret of one connection does not open another's buffers; plaintext from another host is refused;
a crafted (pickle) CUDA IPC descriptor is refused before anything is decoded or executed.
"""

from __future__ import annotations

import base64
import os
import pickle
import secrets
import sys
import types

import pytest

from mesh.transport import channel, connect
from mesh.transport.base import BufferDescriptor, InvalidKey, NotAuthorized
from mesh.transport.shm import ShmConnection
from mesh.transport.tcp import TcpConnection
from nodeagent.registrar import Registrar


@pytest.fixture
def registrar():
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-a1": object(), "s-a2": object(), "s-b1": object(),
                                                             "s-b2": object()})
    r = Registrar(agent, "127.0.0.1:0")
    yield r
    r.close()


def two_connections(r):
    """Tenant A's connection m-a (slices s-a1, s-a2) and tenant B's m-b, each with its secret."""
    sa, sb = secrets.token_bytes(32), secrets.token_bytes(32)
    da = r.register("s-a1", 4096, "tcp", "m-a", sa)
    db = r.register("s-b1", 4096, "tcp", "m-b", sb)
    return da, sa, db, sb


def test_owner_with_the_secret_reads_and_writes(registrar):
    da, sa, _, _ = two_connections(registrar)
    with TcpConnection(da, secret=sa) as c:
        c.write(0, b"mine")
        assert c.read(0, 4) == b"mine"


def test_tcp_without_the_secret_is_refused_and_writes_nothing(registrar):
    da, sa, db, sb = two_connections(registrar)
    with TcpConnection(da, secret=sa) as owner:
        owner.write(0, b"A" * 16)
    # B knows A's descriptor (rkey and all) but not A's secret: the agent's data plane refuses an anonymous
    # channel at the handshake (every buffer it serves has a secret), so it cannot use A's key (counted)
    refused = channel.CHANNELS.labels("refused_secret")._value.get()
    with pytest.raises(NotAuthorized, match="secret"):
        TcpConnection(da)
    assert channel.CHANNELS.labels("refused_secret")._value.get() == refused + 1
    # ... B's own secret does not open A's buffer: the channel is refused at the handshake (and counted)
    refused = channel.CHANNELS.labels("refused_secret")._value.get()
    with pytest.raises(NotAuthorized, match="secret"):
        TcpConnection(da, secret=sb)
    assert channel.CHANNELS.labels("refused_secret")._value.get() == refused + 1
    # ... and a channel B authenticated for its own buffer cannot reach A's key through it
    with TcpConnection(db, secret=sb) as mine:
        mine._key, mine._base = da.rkey, da.address
        with pytest.raises(InvalidKey):
            mine.write(0, b"evil")
        with pytest.raises(InvalidKey):
            mine.read(0, 4)
    with TcpConnection(da, secret=sa) as owner:
        assert owner.read(0, 16) == b"A" * 16


def test_shm_attach_needs_the_connection_secret(registrar):
    sa, sb = secrets.token_bytes(32), secrets.token_bytes(32)
    da = registrar.register("s-a1", 4096, "shm", "m-a", sa)
    registrar.register("s-b1", 4096, "shm", "m-b", sb)
    with pytest.raises(NotAuthorized, match="secret"):
        ShmConnection(BufferDescriptor(**vars(da)))               # the rkey alone
    with pytest.raises(NotAuthorized, match="secret"):
        ShmConnection(BufferDescriptor(**vars(da)), sb)           # another connection's secret
    with pytest.raises(NotAuthorized):
        connect(BufferDescriptor(**vars(da)), secret=sb)           # and no fallback to TCP opens it either
    with ShmConnection(BufferDescriptor(**vars(da)), sa) as c:
        c.write(0, b"ok")
        assert c.read(0, 2) == b"ok"


def test_plaintext_from_another_host_is_refused_tls_with_the_pinned_certificate_works(registrar, monkeypatch):
    da, sa, _, _ = two_connections(registrar)
    assert da.tls_sha256 == registrar.server.tls_sha256 and len(da.tls_sha256) == 32
    monkeypatch.setattr(channel, "same_host", lambda sock: False)        # as if the peer were another host
    plain = BufferDescriptor(**{**vars(da), "tls_sha256": b""})
    with pytest.raises(NotAuthorized, match="requires TLS"):
        TcpConnection(plain, secret=sa)
    with TcpConnection(da, secret=sa) as c:
        assert c.tls
        c.write(0, b"over tls")
        assert c.read(0, 8) == b"over tls"
    wrong = BufferDescriptor(**{**vars(da), "tls_sha256": bytes(32)})  # a certificate the control plane did not name
    with pytest.raises(NotAuthorized, match="certificate"):
        TcpConnection(wrong, secret=sa)


def test_mesh_tls_off_allows_plaintext_between_hosts(monkeypatch):
    agent = types.SimpleNamespace(node="n1", endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                  desired_hooks=[], desired={"s-1": object()})
    r = Registrar(agent, "127.0.0.1:0", tls=False)
    try:
        s = secrets.token_bytes(32)
        d = r.register("s-1", 64, "tcp", "m-1", s)
        assert d.tls_sha256 == b""
        monkeypatch.setattr(channel, "same_host", lambda sock: False)
        with TcpConnection(d, secret=s) as c:
            assert not c.tls
            c.write(0, b"x")
    finally:
        r.close()


def test_registrar_refuses_a_short_secret(registrar):
    with pytest.raises(ValueError, match="128 bits"):
        registrar.register("s-a1", 64, "tcp", "m-a", b"short")


# -- CUDA IPC descriptors ------------------------------------------------------------------------

class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))       # executed by pickle.loads: creates the marker file


@pytest.fixture
def fake_cuda_torch(monkeypatch):
    """torch with CUDA "available": on old code the pickle would reach pickle.loads."""
    opened = []
    storage = types.SimpleNamespace(_new_shared_cuda=lambda *a: opened.append(a) or types.SimpleNamespace(device="cuda:0"))
    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True, init=lambda: None),
                                  UntypedStorage=storage, uint8="uint8",
                                  empty=lambda *a, **k: types.SimpleNamespace(set_=lambda s: "tensor"))
    monkeypatch.setitem(sys.modules, "torch", torch)
    return opened


def test_crafted_pickle_cuda_ipc_descriptor_is_refused_and_nothing_runs(tmp_path, fake_cuda_torch):
    from mesh.transport import cuda_ipc
    marker = tmp_path / "pwned"
    d = BufferDescriptor(buffer_id="b-1", slice_id="s-1", node="n1", transport="cuda_ipc", length=64,
                         ipc_handle=pickle.dumps(_Boom(str(marker))))
    with pytest.raises(cuda_ipc.InvalidDescriptor) as e:
        cuda_ipc.CudaIpcConnection(d)
    assert e.value.field == "ipc_handle" and "never a pickle" in e.value.message
    assert not marker.exists() and fake_cuda_torch == []


@pytest.mark.parametrize("doc, field", [
    ({"v": 1}, "ipc_handle"),
    ({**{"v": 1, "device": 0, "handle": "", "size": 64, "offset": 0, "ref_counter_handle": "",
         "ref_counter_offset": 0, "event_handle": "", "event_sync_required": False}, "device": True}, "ipc_handle.device"),
    ({"v": 1, "device": 0, "handle": "!!", "size": 64, "offset": 0, "ref_counter_handle": "",
      "ref_counter_offset": 0, "event_handle": "", "event_sync_required": False}, "ipc_handle.handle"),
    ({"v": 1, "device": 0, "handle": base64.b64encode(b"x" * 300).decode(), "size": 64, "offset": 0,
      "ref_counter_handle": "", "ref_counter_offset": 0, "event_handle": "", "event_sync_required": False},
     "ipc_handle.handle"),
])
def test_cuda_ipc_handle_is_decoded_strictly(doc, field):
    import json

    from mesh.transport import cuda_ipc
    with pytest.raises(cuda_ipc.InvalidDescriptor) as e:
        cuda_ipc.decode_handle(json.dumps(doc).encode(), "b-1")
    assert e.value.field == field


def test_cuda_ipc_handle_round_trips_as_data(fake_cuda_torch):
    from mesh.transport import cuda_ipc
    handle = (0, os.urandom(64), 1 << 20, 0, b"/torch_123_456", 8, os.urandom(64), True)
    data = cuda_ipc.encode_handle(handle)
    assert data.startswith(b"{") and cuda_ipc.decode_handle(data) == handle
    d = BufferDescriptor(buffer_id="b-1", slice_id="s-1", node="n1", transport="cuda_ipc", length=1 << 20,
                         ipc_handle=data)
    cuda_ipc.CudaIpcConnection(d)
    assert fake_cuda_torch == [handle]
