"""`meshctl bench mesh`: each mesh transport through the path the mesh really uses, against named baselines.

Starts a real local cluster (embedded etcd, the control plane, one agent
process per node, two simulated nodes; InfiniBand NICs on both when this host
has an RDMA device), allocates slices, and connects them with
`MeshService.Connect` as a workload would: the control plane brokers, the
agents register the buffers, the connection's secret authenticates every
channel. This process (the "workload") then opens the peer's buffer with the
SDK and measures one-sided writes and reads of `--size-mb` (best of `--repeat`
interleaved rounds), and the median latency of small writes:

* tcp: slices on two nodes, the agent's TCP data plane (plaintext: the nodes
  share this host, as two hosts with `mesh_tls: false` would);
* tcp_tls: the same buffer over TLS 1.3 (what a channel from another host
  costs, measured on loopback);
* shm: slices on one node, the agent's shared memory segment;
* verbs: slices on two nodes with RDMA (only with an RDMA device).

Baselines run in the same rounds between this process and a helper process:
a plain TCP socket (`raw_tcp`, the baseline of tcp and tcp_tls) and a copy
between two processes through a Unix socket (`unix_socket_copy`, the baseline
of shm: what moving the bytes into another process costs without shared
memory). Every ratio names its baseline. Every run ends with a checksum of
what the peer holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

from tools.meshctl.common import info, out, positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl bench mesh --size-mb 4 -o json
  meshctl bench mesh --size-mb 64 --total-mb 2048 --repeat 5

Prints {"transports": {"tcp": {...}, "tcp_tls": {...}, "shm": {...}, "verbs": {...} where available},
"baselines": {"raw_tcp": {...}, "unix_socket_copy": {...}}, "skipped": {transport: why},
"path": "...", ...}; per transport write_mb_per_s, read_mb_per_s, p50_us (writes of --small-bytes),
connect_ms (MeshService.Connect), data_path, and `vs_baseline` with `baseline` naming what it
compares with (tcp_tls also `vs_tcp`: the cost of TLS).
"""


def register(kinds) -> None:
    p = subcommand(kinds, "mesh", help="mesh transports through a real local cluster, against named baselines",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--size-mb", type=positive_float, default=4.0, metavar="MB", help="transfer size (default: 4)")
    p.add_argument("--total-mb", type=positive_int, default=256, metavar="MB",
                   help="bytes moved per measurement (default: 256)")
    p.add_argument("--repeat", type=positive_int, default=3, metavar="N", help="best of N runs (default: 3)")
    p.add_argument("--small-bytes", type=positive_int, default=64, metavar="B",
                   help="size of the small writes timed for p50_us (default: 64)")
    p.set_defaults(func=run_mesh_bench)


# -- the peer process ------------------------------------------------------------------------

def serve(size: int) -> None:
    """Run in the peer process: one registered buffer and a raw socket sink; report on stdout."""
    import threading

    from mesh.transport.base import new_key
    from mesh.transport.shm import ShmRegion
    from mesh.transport.tcp import SOCK_BUF, TcpDataPlane, recv_exact, tune

    plane = TcpDataPlane("127.0.0.1", 0, "127.0.0.1")
    region = ShmRegion(f"bench-{os.getpid()}", size, new_key())
    served = plane.regions.add(region.buffer_id, "bench", region.data, region.rkey)
    sink = socket.create_server(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    import tempfile
    unix_path = os.path.join(tempfile.mkdtemp(prefix="gpumesh-bench-"), "copy.sock")
    usink = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    usink.bind(unix_path)
    usink.listen(8)
    scratch = memoryview(bytearray(size))

    def raw(conn: socket.socket) -> None:
        if conn.family != socket.AF_UNIX:
            tune(conn)
        hdr = memoryview(bytearray(9))
        try:
            while True:
                recv_exact(conn, hdr)
                read, n = struct.unpack("<?Q", hdr)
                if read:          # stream n bytes to the client
                    while n:
                        k = min(n, size)
                        conn.sendall(scratch[:k])
                        n -= k
                else:             # swallow n bytes, then one byte of ack
                    while n:
                        k = conn.recv_into(scratch, min(n, size))
                        if not k:
                            return
                        n -= k
                    conn.sendall(b"\x01")
        except (ConnectionError, OSError):
            pass

    def accept(lsock) -> None:
        while True:
            c, _ = lsock.accept()
            threading.Thread(target=raw, args=(c,), daemon=True).start()

    threading.Thread(target=accept, args=(sink,), daemon=True).start()
    threading.Thread(target=accept, args=(usink,), daemon=True).start()
    print(json.dumps({"endpoint": plane.endpoint, "address": served.base, "rkey": region.rkey,
                      "shm_name": region.name, "buffer_id": region.buffer_id,
                      "raw": sink.getsockname()[1], "unix": unix_path}), flush=True)
    sys.stdin.read()      # until the bench closes our stdin
    plane.regions.remove(region.rkey)
    region.revoke()


# -- measuring -------------------------------------------------------------------------------

def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / 1e6 / seconds, 1) if seconds > 0 else 0.0


class Best:
    """Best (shortest) time per measurement over interleaved rounds: background load hits the
    transports and their baselines alike."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        self.t[name] = min(dt, self.t.get(name, dt))

    def mbps(self, name: str, nbytes: int) -> float:
        return _mbps(nbytes, self.t[name])


def connection_ops(conn, payload: memoryview, count: int) -> tuple:
    """(write all, read all) callables: posted with a window of requests in flight where the
    transport has them (TCP, like RDMA work requests), one at a time otherwise."""
    size = payload.nbytes
    sink = bytearray(size)
    if hasattr(conn, "post_write"):
        def write():
            for _ in range(count):
                conn.post_write(0, payload)
            conn.flush()

        def read():
            for _ in range(count):
                conn.post_read(0, size, sink)
            conn.flush()
    else:
        def write():
            for _ in range(count):
                conn.write(0, payload)

        def read():
            for _ in range(count):
                conn.read(0, size, into=sink)
    return write, read


def small_writes(conn, payload: memoryview, small: int) -> dict:
    tiny = payload[:small]
    lat = []
    for _ in range(2000):
        t0 = time.perf_counter()
        conn.write(0, tiny)
        lat.append(time.perf_counter() - t0)
    conn.write(0, payload)
    ok = hashlib.sha256(conn.read(0, payload.nbytes)).digest() == hashlib.sha256(payload).digest()
    return {"p50_us": round(statistics.median(lat) * 1e6, 1), "small_bytes": small, "checksum_ok": ok}


def raw_socket_ops(port, payload: memoryview, count: int):
    """(socket, write, read) of a plain stream to the helper process: TCP to `port` (int) or a Unix socket (path)."""
    from mesh.transport.tcp import recv_exact, tune
    size = payload.nbytes
    if isinstance(port, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(port)
    else:
        sock = socket.create_connection(("127.0.0.1", port))
        tune(sock)
    ack = memoryview(bytearray(1))
    sink = memoryview(bytearray(size))

    def write() -> None:
        sock.sendall(struct.pack("<?Q", False, size * count))
        for _ in range(count):
            sock.sendall(payload)
        recv_exact(sock, ack)

    def read() -> None:
        sock.sendall(struct.pack("<?Q", True, size * count))
        for _ in range(count):
            recv_exact(sock, sink)
    return sock, write, read


BENCH_HOSTS = [{"node": n, "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]} for n in ("bench-a", "bench-b")]
IB_NIC = [{"name": "mlx5_0", "kind": "infiniband", "rate_gbps": 400, "gpus": [0]}]


def _slice_on(client, node: str, other: str):
    client.cordon(other)
    try:
        return client.allocate(tenant="bench", mig_profile="1g.10gb").slices[0]
    finally:
        client.uncordon(other)


def _connect(client, a, b, size: int, transport: str = ""):
    t0 = time.perf_counter()
    conn = client.mesh_connect(a.id, b.id, size_bytes=size, transport=transport)
    return conn, round((time.perf_counter() - t0) * 1e3, 1)


def run_bench(size_mb: float, total_mb: int, repeat: int, small: int) -> dict:
    import tempfile

    from mesh.transport import verbs
    from mesh.transport.base import BufferDescriptor
    from mesh.transport.tcp import TcpConnection
    from tools.localcluster import LocalCluster
    size = int(size_mb * (1 << 20))
    count = max(4, (total_mb << 20) // size)
    payload = memoryview(os.urandom(size))
    has_verbs, why_not = verbs.available()
    hosts = [{**h, "nics": IB_NIC} for h in BENCH_HOSTS] if has_verbs else BENCH_HOSTS
    result: dict = {"transports": {}, "skipped": {}, "baselines": {},
                    "path": "MeshService.Connect on a local cluster (etcd, control plane, one agent process per "
                            "node), then the SDK's mesh_open from this process"}
    with tempfile.TemporaryDirectory(prefix="gpumesh-bench-mesh-") as d:
        cluster = LocalCluster(d, hosts, agents_per_process=1, log_level="warning")
        info("starting a local cluster (etcd, control plane, 2 agents)...")
        cluster.start(timeout=120)
        peer = subprocess.Popen([sys.executable, "-c", f"from tools.meshctl.benchmesh import serve; serve({size})"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened = []
        try:
            facts = json.loads(peer.stdout.readline())
            with cluster.client(timeout=60) as client:
                a, b = _slice_on(client, "bench-a", "bench-b"), _slice_on(client, "bench-b", "bench-a")
                a2 = _slice_on(client, "bench-a", "bench-b")
                cross, cross_ms = _connect(client, a, b, size, "tcp")
                same, same_ms = _connect(client, a, a2, size)
                conns = {"tcp": (cross, cross_ms), "shm": (same, same_ms)}
                ops: dict = {}
                tcp = client.mesh_open(cross, side="b")
                tls = TcpConnection(BufferDescriptor.from_proto(cross.b), secret=cross.secret, force_tls=True)
                shm = client.mesh_open(same, side="b")
                opened += [tcp, tls, shm]
                assert tls.tls and not tcp.tls and type(shm).__name__ == "ShmConnection"
                conns["tcp_tls"] = (cross, cross_ms)
                live = {"tcp": tcp, "tcp_tls": tls, "shm": shm}
                if has_verbs:
                    rc, rc_ms = _connect(client, a, b, size)
                    if rc.transport == "verbs":
                        live["verbs"] = client.mesh_open(rc, side="b")
                        opened.append(live["verbs"])
                        conns["verbs"] = (rc, rc_ms)
                    else:
                        result["skipped"]["verbs"] = f"the control plane chose {rc.transport}: {rc.fallback_reason}"
                else:
                    result["skipped"]["verbs"] = why_not
                raw_sock, raw_w, raw_r = raw_socket_ops(facts["raw"], payload, count)
                unix_sock, unix_w, unix_r = raw_socket_ops(facts["unix"], payload, count)
                opened += [raw_sock, unix_sock]
                ops.update(raw_tcp_w=raw_w, raw_tcp_r=raw_r, unix_w=unix_w, unix_r=unix_r)
                for name, conn in live.items():
                    ops[f"{name}_w"], ops[f"{name}_r"] = connection_ops(conn, payload, count)
                info(f"{count} x {size_mb:g} MB per measurement, best of {repeat} interleaved rounds")
                for fn in ops.values():
                    fn()                          # warm up (page faults, socket buffers)
                best = Best()
                for i in range(repeat):
                    info(f"  round {i + 1}/{repeat}")
                    for name, fn in ops.items():
                        best.run(name, fn)
                n = size * count
                base = {"raw_tcp": {"write_mb_per_s": best.mbps("raw_tcp_w", n),
                                    "read_mb_per_s": best.mbps("raw_tcp_r", n),
                                    "what": "a plain TCP socket between this process and a helper process (no "
                                            "framing, no authentication, no TLS)"},
                        "unix_socket_copy": {"write_mb_per_s": best.mbps("unix_w", n),
                                             "read_mb_per_s": best.mbps("unix_r", n),
                                             "what": "the bytes copied into another process through a Unix "
                                                     "socket (the copy between two processes that shared "
                                                     "memory avoids)"}}
                result["baselines"] = base
                baseline_of = {"tcp": "raw_tcp", "tcp_tls": "raw_tcp", "shm": "unix_socket_copy", "verbs": "raw_tcp"}
                for name, conn in live.items():
                    c, ms = conns[name]
                    t = {"write_mb_per_s": best.mbps(f"{name}_w", n), "read_mb_per_s": best.mbps(f"{name}_r", n),
                         **small_writes(conn, payload, small), "connect_ms": ms,
                         "data_path": ("tcp_tls" if conn.tls else "tcp") if hasattr(conn, "tls") else c.data_path,
                         "record_data_path": c.data_path,
                         "baseline": baseline_of[name]}
                    b0 = base[baseline_of[name]]
                    t["vs_baseline"] = round(t["write_mb_per_s"] / b0["write_mb_per_s"], 3) \
                        if b0["write_mb_per_s"] else None
                    t["read_vs_baseline"] = round(t["read_mb_per_s"] / b0["read_mb_per_s"], 3) \
                        if b0["read_mb_per_s"] else None
                    result["transports"][name] = t
                if "tcp" in result["transports"] and "tcp_tls" in result["transports"]:
                    p, s_ = result["transports"]["tcp"], result["transports"]["tcp_tls"]
                    s_["vs_tcp"] = round(s_["write_mb_per_s"] / p["write_mb_per_s"], 3) if p["write_mb_per_s"] else None
                    s_["read_vs_tcp"] = round(s_["read_mb_per_s"] / p["read_mb_per_s"], 3) if p["read_mb_per_s"] else None
                    s_["p50_us_vs_tcp"] = round(s_["p50_us"] / p["p50_us"], 3) if p["p50_us"] else None
                for conn in opened:
                    conn.close()
                opened.clear()
                client.mesh_disconnect(cross.id)
                client.mesh_disconnect(same.id)
        finally:
            for conn in opened:
                try:
                    conn.close()
                except Exception:
                    pass
            if peer.stdin:
                peer.stdin.close()
            try:
                peer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                peer.kill()
            cluster.stop()
    result.update({"size_mb": size_mb, "transfers": count, "repeat": repeat})
    return result


def run_mesh_bench(args: argparse.Namespace) -> int:
    from tools.meshctl.output import dump, render_table
    result = run_bench(args.size_mb, args.total_mb, args.repeat, args.small_bytes)
    if args.output in ("json", "yaml"):
        out(dump(result, args.output))
        return 0
    rows = [[name, t["data_path"], t["write_mb_per_s"], t["read_mb_per_s"], t["p50_us"], t["connect_ms"],
             f"{t['vs_baseline']} of {t['baseline']}"] for name, t in result["transports"].items()]
    rows += [[name, "(baseline)", b["write_mb_per_s"], b["read_mb_per_s"], "", "", ""]
             for name, b in result["baselines"].items()]
    rows += [[name, "skipped: " + why, "", "", "", "", ""] for name, why in result["skipped"].items()]
    out(render_table(["TRANSPORT", "DATA PATH", "WRITE MB/S", "READ MB/S", "P50 US", "CONNECT MS", "VS BASELINE"],
                     rows))
    return 0
