"""`meshctl bench mesh`: data-plane throughput and latency per transport, against local baselines.

Starts a peer process that registers one buffer the way an agent does (a
shared memory segment served by a TCP data plane) and runs a plain socket sink
next to it. This process then measures, per transport, one-sided writes and
reads of `--size-mb` (best of `--repeat` runs), and the median latency of
small writes; and in the same run a plain socket between the same two
processes (`raw_socket_mb_per_s`) and a local memory copy (`memcpy_mb_per_s`).
Every run ends with a checksum of what the peer holds.
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

Prints {"transports": {"tcp": {...}, "shm": {...}, "verbs": {...} where available},
"raw_socket_mb_per_s", "memcpy_mb_per_s", "skipped": {transport: why}, ...}; per transport
write_mb_per_s, read_mb_per_s, p50_us (writes of --small-bytes) and the ratio to its baseline.
"""


def register(kinds) -> None:
    p = subcommand(kinds, "mesh", help="mesh data plane: tcp / shm / verbs against raw socket and memcpy",
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
    served = plane.add(region.buffer_id, "bench", region.data, region.rkey)
    sink = socket.create_server(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    scratch = memoryview(bytearray(size))

    def raw(conn: socket.socket) -> None:
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

    def accept() -> None:
        while True:
            c, _ = sink.accept()
            threading.Thread(target=raw, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(json.dumps({"endpoint": plane.endpoint, "address": served.base, "rkey": region.rkey,
                      "shm_name": region.name, "buffer_id": region.buffer_id,
                      "raw": sink.getsockname()[1]}), flush=True)
    sys.stdin.read()      # until the bench closes our stdin
    plane.remove(region.rkey)
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


def measure_connection(conn, payload: memoryview, count: int, repeat: int, small: int) -> dict:
    best = Best()
    write, read = connection_ops(conn, payload, count)
    write(), read()
    for _ in range(repeat):
        best.run("w", write)
        best.run("r", read)
    n = payload.nbytes * count
    return {"write_mb_per_s": best.mbps("w", n), "read_mb_per_s": best.mbps("r", n),
            **small_writes(conn, payload, small)}


def raw_socket_ops(port: int, payload: memoryview, count: int):
    from mesh.transport.tcp import recv_exact, tune
    size = payload.nbytes
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


def memcpy_op(payload: memoryview, count: int):
    dst = memoryview(bytearray(payload.nbytes))
    dst[:] = payload

    def run() -> None:
        for _ in range(count):
            dst[:] = payload
    return run


def verbs_loopback(payload: memoryview, count: int, repeat: int, small: int) -> dict:
    """Two buffers on the first RDMA device, QPs connected to each other (needs a device)."""
    from mesh.transport.verbs import VerbsTransport
    t = VerbsTransport("bench")
    try:
        a = t.register("bench-a", payload.nbytes)
        b = t.register("bench-b", payload.nbytes)
        t.connect(a, local_buffer_id=b.buffer_id)
        return measure_connection(t.connect(b, local_buffer_id=a.buffer_id), payload, count, repeat, small)
    finally:
        t.close()


def run_bench(size_mb: float, total_mb: int, repeat: int, small: int) -> dict:
    from mesh.transport import verbs
    from mesh.transport.base import BufferDescriptor
    from mesh.transport.shm import ShmConnection
    from mesh.transport.tcp import TcpConnection
    size = int(size_mb * (1 << 20))
    count = max(4, (total_mb << 20) // size)
    payload = memoryview(os.urandom(size))
    peer = subprocess.Popen([sys.executable, "-c", f"from tools.meshctl.benchmesh import serve; serve({size})"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        facts = json.loads(peer.stdout.readline())
        desc = BufferDescriptor(buffer_id=facts["buffer_id"], slice_id="bench", node="local", transport="tcp",
                                address=facts["address"], length=size, rkey=facts["rkey"],
                                endpoint=facts["endpoint"], shm_name=facts["shm_name"])
        result: dict = {"transports": {}, "skipped": {}}
        info(f"{count} x {size_mb:g} MB per measurement, best of {repeat} interleaved rounds")
        n = size * count
        raw_sock, raw_w, raw_r = raw_socket_ops(facts["raw"], payload, count)
        mem = memcpy_op(payload, count)
        tcp, shm = TcpConnection(desc), ShmConnection(desc.with_transport("shm"))
        try:
            tcp_w, tcp_r = connection_ops(tcp, payload, count)
            shm_w, shm_r = connection_ops(shm, payload, count)
            ops = {"raw_w": raw_w, "tcp_w": tcp_w, "raw_r": raw_r, "tcp_r": tcp_r, "mem": mem, "shm_w": shm_w,
                   "shm_r": shm_r}
            for fn in ops.values():
                fn()                          # warm up (page faults, socket buffers)
            best = Best()
            for i in range(repeat):
                info(f"  round {i + 1}/{repeat}")
                for name, fn in ops.items():
                    best.run(name, fn)
            raw = best.mbps("raw_w", n)
            memcpy_mbps = best.mbps("mem", n)
            t = {"write_mb_per_s": best.mbps("tcp_w", n), "read_mb_per_s": best.mbps("tcp_r", n),
                 **small_writes(tcp, payload, small), "window": 64}
            t["vs_raw_socket"] = round(t["write_mb_per_s"] / raw, 3) if raw else None
            t["read_vs_raw_socket"] = round(t["read_mb_per_s"] / best.mbps("raw_r", n), 3)
            result["transports"]["tcp"] = t
            m = {"write_mb_per_s": best.mbps("shm_w", n), "read_mb_per_s": best.mbps("shm_r", n),
                 **small_writes(shm, payload, small)}
            m["vs_memcpy"] = round(m["write_mb_per_s"] / memcpy_mbps, 3) if memcpy_mbps else None
            m["read_vs_memcpy"] = round(m["read_mb_per_s"] / memcpy_mbps, 3) if memcpy_mbps else None
            result["transports"]["shm"] = m
        finally:
            tcp.close()
            shm.close()
            raw_sock.close()
        ok, why = verbs.available()
        if ok:
            info("rdma verbs (loopback between two queue pairs)")
            result["transports"]["verbs"] = verbs_loopback(payload, count, repeat, small)
        else:
            result["skipped"]["verbs"] = why
        result.update({"raw_socket_mb_per_s": raw, "raw_socket_read_mb_per_s": best.mbps("raw_r", n),
                       "memcpy_mb_per_s": memcpy_mbps,
                       "size_mb": size_mb, "transfers": count, "repeat": repeat})
        return result
    finally:
        if peer.stdin:
            peer.stdin.close()
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()


def run_mesh_bench(args: argparse.Namespace) -> int:
    from tools.meshctl.output import dump, render_table
    result = run_bench(args.size_mb, args.total_mb, args.repeat, args.small_bytes)
    if args.output in ("json", "yaml"):
        out(dump(result, args.output))
        return 0
    rows = [[name, t["write_mb_per_s"], t["read_mb_per_s"], t["p50_us"], t.get("vs_raw_socket", t.get("vs_memcpy", ""))]
            for name, t in result["transports"].items()]
    rows += [["raw socket", result["raw_socket_mb_per_s"], result["raw_socket_read_mb_per_s"], "", ""],
             ["memcpy", result["memcpy_mb_per_s"], "", "", ""]]
    rows += [[name, "skipped: " + why, "", "", ""] for name, why in result["skipped"].items()]
    out(render_table(["TRANSPORT", "WRITE MB/S", "READ MB/S", "P50 US", "OF BASELINE"], rows))
    return 0
