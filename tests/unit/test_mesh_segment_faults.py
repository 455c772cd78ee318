"""A tenant that shrinks its mesh segment, or overwrites its header, breaks its own buffer, not the agent.

The segment behind a tcp/shm/verbs buffer is the tenant's file (docs/security.md). Each scenario
runs in a child process, as the agent's registrar does its work, so that a SIGBUS shows as the
child's signal exit, not as a crashed pytest. The child prints one JSON line per step: the step's
outcome (the exception's class name, or what came back).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(body: str, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, dict]:
    """Run PRELUDE + `body` in a fresh interpreter; its exit and its steps' outcomes."""
    conn = "m-" + secrets.token_hex(6)          # segments are named for the connection: the child's own
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "proto")]), "CONN": conn}
    try:
        r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                           text=True, env=env, timeout=timeout, cwd=ROOT)
    finally:
        for name in glob.glob(f"/dev/shm/gpumesh-b-{conn}-*"):     # what a child killed by a signal left
            os.unlink(name)
    steps = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            steps.update(json.loads(line))
    return r, steps


def run_child(body: str) -> dict:
    r, steps = child(body)
    died = f"killed by {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit {r.returncode}"
    assert r.returncode == 0, f"the child ({died}) got through {steps}\n{r.stderr[-3000:]}"
    return steps


PRELUDE = """
import asyncio, json, logging, os, secrets, struct, types
from mesh.transport import connect
from mesh.transport.tcp import TcpConnection
from nodeagent.registrar import Registrar

CONN = os.environ["CONN"]

def step(name, fn):
    try:
        out = fn()
    except Exception as e:                 # the outcome is the error's class (and its fields when typed)
        out = {"error": type(e).__name__, "message": str(e)[:300],
               **{k: getattr(e, k) for k in ("size", "expected", "reason") if hasattr(e, k)}}
    print(json.dumps({name: out if isinstance(out, (dict, str, int, list)) or out is None else repr(out)}),
          flush=True)
    return out

def shrink(name, size):
    fd = os.open("/dev/shm/" + name, os.O_RDWR)       # the tenant's own descriptor of its file
    os.ftruncate(fd, size)
    os.close(fd)

warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append({"msg": record.getMessage(), **getattr(record, "fields", {})})
logging.getLogger().addHandler(Catch())

def agent(node, *slices):
    return types.SimpleNamespace(node=node, endpoint="127.0.0.1:50051", handlers={}, session_hooks=[],
                                 desired_hooks=[], desired={s: types.SimpleNamespace(tenant="team-a")
                                                            for s in slices})

def damaged_count():
    from prometheus_client import REGISTRY
    return {r: REGISTRY.get_sample_value("gpumesh_mesh_buffers_damaged_total", {"reason": r}) for r in
            ("shrunk", "header")}
"""


def test_a_shrunk_segment_fails_its_buffer_and_the_agent_goes_on():
    """tcp and shm buffers served by the agent's data plane, plaintext (one host) and TLS (what a channel
    from another host uses): the shrunk buffer answers BufferDamaged, the other buffer keeps working, and
    revoking the damaged buffer is fine. On the old code the TLS write decrypts into the truncated mapping
    in user mode: the child dies with SIGBUS."""
    steps = run_child("""
    r = Registrar(agent("n1", "s-1", "s-2"), "127.0.0.1:0")       # TLS on (the default): a self-signed identity
    secret = secrets.token_bytes(32)
    bad = r.register("s-1", 1 << 20, "shm", CONN, secret)
    good = r.register("s-2", 1 << 20, "tcp", CONN, secret)
    plain = TcpConnection(bad, secret=secret)
    tls = TcpConnection(bad, secret=secret, force_tls=True)
    other = TcpConnection(good, secret=secret, force_tls=True)
    step("before", lambda: [plain.write(0, b"x" * 100), tls.read(0, 3).decode()])
    shrink(bad.shm_name, 4096)                                   # one page of header and data left
    payload = os.urandom(1 << 19)
    step("tls_write", lambda: tls.write(8192, payload))
    step("tls_read", lambda: tls.read(8192, 1000))
    step("plain_write", lambda: plain.write(8192, payload))
    step("plain_read", lambda: plain.read(0, 100))
    step("other_tls", lambda: other.write(4096, payload) == len(payload) and other.read(4096, len(payload)) == payload)
    step("other_plain", lambda: TcpConnection(good, secret=secret).read(4096, 16) == payload[:16])
    step("messages", lambda: [plain.send(b"hi"), plain.recv(timeout=5).decode()])
    step("warnings", lambda: warnings)
    step("counted", damaged_count)
    step("deregister", lambda: r.deregister(bad.buffer_id, "test"))
    step("other_after", lambda: other.read(4096, 16) == payload[:16])
    r.close()
    """)
    assert steps["before"] == [100, "xxx"]
    for op in ("tls_write", "tls_read", "plain_write", "plain_read"):
        assert steps[op]["error"] == "BufferDamaged", (op, steps[op])
        assert steps[op]["reason"] == "shrunk", steps[op]
        assert f"shrunk to 4096 bytes (it needs {64 + (1 << 20)}" in steps[op]["message"], steps[op]
    assert steps["other_tls"] is True and steps["other_plain"] is True and steps["other_after"] is True
    assert steps["messages"] == [2, "hi"]                       # two-sided messages are the agent's memory
    [w] = [w for w in steps["warnings"] if "damaged" in w["msg"]]     # one log line per buffer, not per operation
    assert w["buffer"].startswith("b-m-") and w["buffer"].endswith("-s-1") and w["tenant"] == "team-a" and w["slice"] == "s-1" and w["size"] == 4096
    assert steps["counted"]["shrunk"] == 1.0
    assert steps["deregister"] is True


def test_a_shrink_that_races_a_write_is_an_error_not_a_signal():
    """The size is checked before the copy; a shrink after the check meets the system call (EFAULT on a
    plain socket), so the write is refused and the stream stays in step for the next request."""
    steps = run_child("""
    from mesh.transport import segment
    r = Registrar(agent("n1", "s-1"), "127.0.0.1:0")
    secret = secrets.token_bytes(32)
    d = r.register("s-1", 1 << 20, "shm", CONN, secret)
    c = TcpConnection(d, secret=secret)
    real = segment.Segment.damage
    segment.Segment.damage = lambda self, op="": None      # the check sees the file whole...
    shrink(d.shm_name, 4096)                                         # ...and the tenant shrinks it after it
    step("write", lambda: c.write(0, os.urandom(1 << 19)))
    segment.Segment.damage = real
    step("next", lambda: c.read(0, 10))
    step("ping", lambda: c.ping())
    r.close()
    """)
    assert steps["write"]["error"] == "BufferDamaged"
    assert steps["next"]["error"] == "BufferDamaged"                 # the buffer stays failed
    assert steps["ping"] is None                                     # the channel is in step


def test_a_buffer_deregistered_between_its_checks_and_its_copy_answers_revoked():
    """A deregistration releases the buffer's view while a request on it may be past its checks: the copy
    takes its own slice once, up front, and a view already released answers REVOKED with the stream in step
    (the copy used to slice the released view on every pass: ValueError killed the serving thread and the
    caller saw its connection reset)."""
    steps = run_child("""
    from mesh.transport import handler
    r = Registrar(agent("n1", "s-1", "s-2"), "127.0.0.1:0")
    secret = secrets.token_bytes(32)
    d = r.register("s-1", 1 << 20, "shm", CONN, secret)
    c = TcpConnection(d, secret=secret)
    step("before", lambda: c.write(0, b"abc"))
    real = handler.RequestHandler._segment_ok
    def ok_then_deregistered(self, region, op):
        out = real(self, region, op)
        region.data.release()                  # what remove() does, right after the checks passed
        return out
    handler.RequestHandler._segment_ok = ok_then_deregistered
    step("write", lambda: c.write(0, os.urandom(1 << 16)))
    step("read", lambda: c.read(0, 16))
    handler.RequestHandler._segment_ok = real
    step("ping", lambda: c.ping())
    r.close()
    """)
    assert steps["before"] == 3
    assert steps["write"]["error"] == "Revoked", steps["write"]
    assert steps["read"]["error"] == "Revoked", steps["read"]
    assert steps["ping"] is None                                     # the channel is in step


def test_rdma_into_a_shrunk_peer_buffer_does_not_fault_the_agent():
    """A real MR pins its pages: the NIC never faults on a segment shrunk after registration. The stand-in
    follows that (and the agent copies only its own staging memory): the agent of the shrunk buffer's peer
    goes on, and a new MR over a shrunk segment (a recovery) is refused with a typed error."""
    steps = run_child("""
    from mesh.transport.tcp import RdmaConnection
    from mesh.transport.verbs import VerbsTransport
    from tests.unit import fakeverbs
    v = fakeverbs.make()
    r1 = Registrar(agent("n1", "s-1"), "127.0.0.1:0", verbs_transport=VerbsTransport("n1", pyverbs=v))
    r2 = Registrar(agent("n2", "s-2"), "127.0.0.1:0", verbs_transport=VerbsTransport("n2", pyverbs=v))
    secret = secrets.token_bytes(32)
    size = 1 << 16
    d1 = r1.register("s-1", size, "verbs", CONN, secret)
    d2 = r2.register("s-2", size, "verbs", CONN, secret)
    from gpumesh.v1 import mesh_service_pb2 as M
    for r, a, b in ((r1, d1, d2), (r2, d2, d1)):                     # the control plane introduces the QPs
        asyncio.run(r.on_peer(M.MeshPeer(buffer_id=a.buffer_id, peer=b.to_proto(), request_id="p"),
                              asyncio.Queue()))
    peer = RdmaConnection(d2, d1, secret=secret)
    data = os.urandom(size)
    step("before", lambda: peer.write(0, data) == size and peer.read(0, size) == data)
    shrink(d2.shm_name, 4096)                                        # s-2's tenant shrinks its buffer
    step("write", lambda: peer.write(0, data))
    step("read", lambda: peer.read(0, size) == data)
    step("again", lambda: peer.write(100, b"abc") == 3 and peer.read(100, 3) == b"abc")
    step("mr_over_shrunk", lambda: r2.verbs.register("s-2", size, buffer=d2.address, buffer_id="b-new"))
    peer.close()
    r1.close()
    r2.close()
    """)
    assert steps["before"] is True
    assert steps["write"] == len(b"x" * (1 << 16))                   # the pinned pages take it
    assert steps["read"] is True and steps["again"] is True
    assert steps["mr_over_shrunk"]["error"] == "TransportError"
    assert "Failed to register a MR" in steps["mr_over_shrunk"]["message"]


def test_recovery_refuses_a_shrunk_or_overwritten_segment():
    """A restarted agent re-adopts a segment only when it is whole: shrunk (even to nothing) or with its
    header overwritten, the buffer is gone (BufferGone, the connection FAILED), never a SIGBUS."""
    steps = run_child("""
    import tempfile
    from nodeagent.registrar import BufferGone
    state = tempfile.mkdtemp()
    r = Registrar(agent("n1", "s-1", "s-2", "s-3"), "127.0.0.1:0", state_dir=state)
    secret = secrets.token_bytes(32)
    ds = {s: r.register(s, 1 << 16, "shm", CONN, secret) for s in ("s-1", "s-2", "s-3")}
    for h in r.buffers.values():                                      # the agent dies (SIGKILL): segments stay
        h.region.detach()
    r.buffers.clear()
    r.server.close()
    shrink(ds["s-1"].shm_name, 4096)
    shrink(ds["s-2"].shm_name, 0)
    fd = os.open("/dev/shm/" + ds["s-3"].shm_name, os.O_RDWR)
    os.pwrite(fd, b"scribble" * 8, 0)                                 # the header overwritten
    os.close(fd)
    r2 = Registrar(agent("n1", "s-1", "s-2", "s-3"), "127.0.0.1:0", state_dir=state)
    for s in ("s-1", "s-2", "s-3"):
        step(s, lambda s=s: r2.register(s, 1 << 16, "shm", CONN, secret, recover=True).buffer_id)
    step("warnings", lambda: [w.get("reason") for w in warnings if "damaged" in w["msg"]])
    step("counted", damaged_count)
    r2.close()
    """)
    assert steps["s-1"]["error"] == "BufferGone" and "shrunk to 4096 bytes" in steps["s-1"]["message"]
    assert steps["s-2"]["error"] == "BufferGone" and "shrunk to 0 bytes" in steps["s-2"]["message"]
    assert steps["s-3"]["error"] == "BufferGone" and "header was overwritten" in steps["s-3"]["message"]
    assert steps["warnings"] == ["shrunk", "shrunk", "header"]
    assert steps["counted"] == {"shrunk": 2.0, "header": 1.0}


def test_a_peer_mapping_sees_typed_errors_for_a_shrunk_or_overwritten_segment():
    """The SDK's shm path (a process that maps the segment): the header is read by pread and the size
    checked before each copy, so a shrink or a scribble before the operation is BufferDamaged."""
    steps = run_child("""
    r = Registrar(agent("n1", "s-1", "s-2"), "127.0.0.1:0")
    secret = secrets.token_bytes(32)
    a = r.register("s-1", 1 << 16, "shm", CONN, secret)
    b = r.register("s-2", 1 << 16, "shm", CONN, secret)
    ca, cb = connect(a, secret=secret), connect(b, secret=secret)
    step("kind", lambda: type(ca).__name__)
    shrink(a.shm_name, 4096)
    step("read_shrunk", lambda: ca.read(8192, 10))
    step("write_shrunk", lambda: ca.write(8192, b"x" * 10))
    fd = os.open("/dev/shm/" + b.shm_name, os.O_RDWR)
    os.pwrite(fd, struct.pack("<Q", 1 << 40), 32)                     # the owner pid field: garbage
    os.close(fd)
    step("write_scribbled", lambda: cb.write(0, b"x"))
    step("attach_shrunk", lambda: connect(a, secret=secret, fallback=False))
    r.close()
    """)
    assert steps["kind"] == "ShmConnection"
    assert steps["read_shrunk"]["error"] == "BufferDamaged" and steps["read_shrunk"]["reason"] == "shrunk"
    assert steps["write_shrunk"]["error"] == "BufferDamaged"
    assert steps["write_scribbled"]["error"] == "BufferDamaged" and steps["write_scribbled"]["reason"] == "header"
    assert steps["attach_shrunk"]["error"] == "BufferDamaged"


@pytest.mark.parametrize("what", ["memoryview", "struct", "tls_recv_into"])
def test_linux_faults_a_user_mode_access_to_a_shrunk_mapping(what):
    """The facts the design stands on (mesh/transport/segment.py): a user-mode access past the file's new end
    is a SIGBUS, a system call an error or a short count, and /dev/shm files take no seals."""
    r, steps = child(f"""
    import fcntl, errno, socket, ssl
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(create=True, size=1 << 20)
    name = shm.name.lstrip("/")
    shrink(name, 4096)
    a, b = socket.socketpair()
    a.sendall(b"y" * 10000)
    step("recv_into", lambda: b.recv_into(shm.buf[8192:18192]))
    step("preadv", lambda: os.preadv(os.open("/dev/zero", os.O_RDONLY), [shm.buf[0:65536]], 0))
    step("pread", lambda: len(os.pread(shm._fd, 65536, 0)))
    step("pwrite_grows", lambda: [os.pwrite(shm._fd, b"z", 65536), os.fstat(shm._fd).st_size])
    shrink(name, 4096)
    step("seal", lambda: fcntl.fcntl(shm._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK))
    step("sealed", lambda: fcntl.fcntl(shm._fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL)
    shm.unlink()
    what = {what!r}
    if what == "memoryview":
        bytes(shm.buf[8192:8200])
    elif what == "struct":
        struct.unpack_from("<Q", shm.buf, 8192)
    else:
        from mesh.transport import channel
        ident = channel.TlsIdentity.self_signed("t")
        ls = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        import threading
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
        client = {{}}
        t = threading.Thread(target=lambda: client.setdefault("tls", cctx.wrap_socket(c)))
        t.start()
        s = ident.server_context().wrap_socket(s, server_side=True)
        t.join()
        client["tls"].sendall(b"q" * 10000)
        s.recv_into(shm.buf[8192:18192])
    print("survived", flush=True)
    """)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr[-2000:])
    assert steps["recv_into"]["error"] == "OSError" and "Bad address" in steps["recv_into"]["message"]
    assert steps["preadv"] == 4096 and steps["pread"] == 4096           # short counts, no signal
    assert steps["pwrite_grows"] == [1, 65537]
    assert steps["seal"]["error"] == "PermissionError"                  # F_SEAL_SEAL is set on /dev/shm files
    assert steps["sealed"] == 1
