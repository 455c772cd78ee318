"""The bridge of isolated workloads (nodeagent/isolation/bridge.py) on this host's real kernel: two processes
in network namespaces of their own get a veth pair and an address each; the host reaches a port one of them
serves, neither reaches the other nor the host's own ports, and their addresses are free once they end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mesh.config import ConfigError
from nodeagent.isolation.bridge import WorkloadBridge, parse_cidr


def test_the_cidr_is_checked_and_names_fit_the_kernels_limit(tmp_path):
    assert str(parse_cidr("10.213.0.0/24")) == "10.213.0.0/24"
    for bad in ("10.213.0.0/23", "10.213.0.0/30", "10.213.0.1/24", "fd00::/120", "nonsense"):
        with pytest.raises(ConfigError, match="workload_bridge_cidr"):
            parse_cidr(bad)
    b = WorkloadBridge(str(tmp_path), "10.213.5.0/24")
    assert len(b.name) <= 15 and len(f"{b.port_prefix}254") <= 15
    assert str(b.gateway) == "10.213.5.1"
    assert WorkloadBridge(str(tmp_path / "other"), "10.213.5.0/24").name != b.name      # one per agent


def _unavailable() -> str:
    if os.geteuid() != 0:
        return "veth pairs, bridges and nftables need root"
    return WorkloadBridge.problem()


def _inside(pid: int, code: str) -> str:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60).stdout.strip()


def _dial(pid: int, host: str, port: int) -> str:
    return _inside(pid, f"import socket\ntry:\n    socket.create_connection(({host!r}, {port}), timeout=3)\n"
                        "    print('CONNECTED')\nexcept OSError as e:\n    print(type(e).__name__)")


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_isolated_namespaces_serve_the_host_and_reach_nothing(tmp_path):
    net = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50 + 128) % 256}"
    b = WorkloadBridge(str(tmp_path), f"{net}.0/24")
    procs = [subprocess.Popen(["unshare", "-n", "sleep", "120"]) for _ in range(2)]
    host_srv = socket.create_server(("0.0.0.0", 0))
    try:
        host_ns = os.readlink("/proc/self/ns/net")
        for p in procs:
            while os.readlink(f"/proc/{p.pid}/ns/net") == host_ns:
                time.sleep(0.01)
        a, c = (b.attach(p.pid) for p in procs)
        assert {a, c} == {f"{net}.2", f"{net}.3"} and b.used() == {2, 3}
        server = subprocess.Popen(["nsenter", f"--net=/proc/{procs[0].pid}/ns/net", sys.executable, "-c",
                                   "import socket\ns = socket.create_server(('0.0.0.0', 8000))\n"
                                   "print('up', flush=True)\n"
                                   "while True:\n    c, _ = s.accept(); c.sendall(b'served'); c.close()"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "up"
            with socket.create_connection((a, 8000), timeout=10) as conn:      # the host reaches it
                assert conn.recv(16) == b"served"
            assert _dial(procs[1].pid, a, 8000) != "CONNECTED"                        # the other workload does not
            port = host_srv.getsockname()[1]
            assert _dial(procs[1].pid, f"{net}.1", port) == "ConnectionRefusedError"    # nor the host's ports
            assert _dial(procs[1].pid, "192.0.2.1", 80) == "OSError"                    # nor anything beyond
        finally:
            server.kill()
            server.wait()
        for p in procs:
            p.kill()
            p.wait()
        deadline = time.monotonic() + 30
        while b.used() and time.monotonic() < deadline:        # the veth pairs go with the namespaces
            time.sleep(0.05)
        assert b.used() == set()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        host_srv.close()
        b.remove()
    assert not os.path.exists(f"/sys/class/net/{b.name}")
