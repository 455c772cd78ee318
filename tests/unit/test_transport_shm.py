"""Same-host shared memory: attach by key, one-sided copies, revocation, a dead owner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mesh.transport import connect, cuda_ipc, mesh_is_faster
from mesh.transport.base import (BufferDescriptor, InvalidKey, OutOfBounds, PeerGone, Revoked, Unsupported)
from mesh.transport.shm import ShmConnection, ShmTransport


@pytest.fixture
def shm():
    t = ShmTransport("n1")
    yield t
    t.close()


def test_write_read_checksum(shm):
    d = shm.register("s-1", 1 << 20)
    data = os.urandom(1 << 20)
    with shm.connect(d) as c:
        c.write(0, data)
        assert hashlib.sha256(c.read(0, 1 << 20)).digest() == hashlib.sha256(data).digest()
        assert bytes(shm.view(d.buffer_id)[10:20]) == data[10:20]


def test_wrong_key_refused_at_attach(shm):
    d = shm.register("s-1", 4096)
    with pytest.raises(InvalidKey):
        ShmConnection(BufferDescriptor(**{**d.__dict__, "rkey": d.rkey + 2}))


def test_bounds(shm):
    d = shm.register("s-1", 4096)
    with shm.connect(d) as c:
        with pytest.raises(OutOfBounds):
            c.write(4095, b"ab")
        with pytest.raises(OutOfBounds):
            c.read(-1, 2)
        c.write(4094, b"ab")


def test_revoked_after_deregister_and_gone_segment(shm):
    d = shm.register("s-1", 4096)
    c = shm.connect(d)
    shm.deregister(d.buffer_id)
    with pytest.raises(Revoked):
        c.write(0, b"x")
    c.close()
    with pytest.raises(Revoked):
        ShmConnection(d)
    with pytest.raises(Unsupported):
        shm.register("s-1", buffer=bytearray(10))


def test_owner_process_dies():
    code = ("import json, sys; from mesh.transport.shm import ShmTransport; t = ShmTransport('n'); "
            "d = t.register('s', 4096); print(json.dumps(d.to_proto().SerializeToString().hex()), flush=True); "
            "sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        from gpumesh.v1 import mesh_service_pb2
        d = BufferDescriptor.from_proto(mesh_service_pb2.BufferDescriptor.FromString(
            bytes.fromhex(json.loads(owner.stdout.readline()))))
        c = connect(d)
        c.write(0, b"alive")
        owner.kill()
        owner.wait(10)
        with pytest.raises(PeerGone):
            c.write(0, b"x")
        c.close()
    finally:
        if owner.poll() is None:
            owner.kill()


def test_connect_falls_back_to_tcp_off_host():
    d = BufferDescriptor("b-1", "s-1", "other-host", "shm", shm_name="gpumesh-nonexistent", endpoint="")
    with pytest.raises(Revoked):
        connect(d)


def test_mesh_is_faster_for_migration():
    assert mesh_is_faster(8 << 30, mesh_mb_per_s=1500, stream_mb_per_s=400)
    assert not mesh_is_faster(1 << 10, mesh_mb_per_s=1500, stream_mb_per_s=400)
    assert not mesh_is_faster(1 << 30, mesh_mb_per_s=0, stream_mb_per_s=400)


CUDA_PEER = """
import base64, pickle, sys
from mesh.transport.cuda_ipc import CudaIpcConnection
d = pickle.loads(base64.b64decode(sys.argv[1]))
c = CudaIpcConnection(d)
sys.stdout.write(c.read(0, 4096).hex() + "\\n")
c.write(8192, bytes(range(256)) * 16)
sys.stdout.flush()
"""


def test_cuda_ipc_across_processes():
    """A slice's device buffer opened by a peer process: it reads what the owner wrote and the owner
    sees what it wrote, through the same device memory."""
    ok, why = cuda_ipc.available()
    if not ok:
        pytest.skip(f"CUDA IPC needs a CUDA GPU: {why}")
    import base64
    import pickle
    t = cuda_ipc.CudaIpcTransport("n1")
    d = t.register("s-1", 1 << 20)
    data = os.urandom(4096)
    own = t.connect(d)  # the owner's own handle: the registered tensor itself
    own.write(0, data)
    r = subprocess.run([sys.executable, "-c", CUDA_PEER, base64.b64encode(pickle.dumps(d)).decode()],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr[-2000:]
    assert bytes.fromhex(r.stdout.split()[0]) == data
    assert own.read(8192, 4096) == bytes(range(256)) * 16
    own.close()
    t.close()
