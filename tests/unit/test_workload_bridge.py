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


def _net() -> str:
    return f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50 + 64) % 128}"


def _netns_proc() -> subprocess.Popen:
    p = subprocess.Popen(["unshare", "-n", "sleep", "300"])
    host_ns = os.readlink("/proc/self/ns/net")
    while os.readlink(f"/proc/{p.pid}/ns/net") == host_ns:
        time.sleep(0.01)
    return p


def _has_table(table: str) -> bool:
    return subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0


def _wait(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_a_flushed_bridge_table_is_applied_again_before_the_next_attach(tmp_path, caplog):
    """M2: an nftables reload (`flush ruleset`, or the table deleted) took the bridge's firewall away: the
    next attach applies it again, with a WARNING and the metrics saying so."""
    from prometheus_client import REGISTRY

    from nodeagent.isolation.nftkeeper import TableKeeper
    b = WorkloadBridge(str(tmp_path), f"{_net()}.0/24", keeper=TableKeeper(interval=3600))   # no timer here
    procs = [_netns_proc() for _ in range(2)]
    try:
        b.attach(procs[0].pid)
        assert _has_table(b.table)
        subprocess.run(["nft", "delete", "table", "inet", b.table], check=True)
        caplog.set_level("WARNING")
        b.attach(procs[1].pid)
        assert _has_table(b.table)
        assert any(r.levelname == "WARNING" and "applied again" in r.getMessage()
                   and r.fields.get("table") == b.table for r in caplog.records)
        assert REGISTRY.get_sample_value("gpumesh_agent_firewall_reapplied_total", {"table": b.table}) == 1
        assert REGISTRY.get_sample_value("gpumesh_agent_firewall_intact", {"table": b.table}) == 0
        # a rule taken out of the table (the chain flushed) counts as changed too
        subprocess.run(["nft", "flush", "chain", "inet", b.table, "input"], check=True)
        assert not b.keeper.check(b.table)
        assert f'iifname "{b.name}" reject' in subprocess.run(["nft", "list", "chain", "inet", b.table, "input"],
                                                               capture_output=True, text=True).stdout
        assert b.keeper.check(b.table)             # as applied now
        assert REGISTRY.get_sample_value("gpumesh_agent_firewall_intact", {"table": b.table}) == 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        b.remove()


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_the_bridge_table_is_applied_again_without_an_attach(tmp_path):
    """M2: the keeper's timer puts a deleted table back while no workload starts."""
    from nodeagent.isolation.nftkeeper import TableKeeper
    keeper = TableKeeper(interval=0.2)
    b = WorkloadBridge(str(tmp_path), f"{_net()}.0/24", keeper=keeper)
    try:
        b.ensure()
        subprocess.run(["nft", "delete", "table", "inet", b.table], check=True)
        _wait(lambda: _has_table(b.table), "the keeper applied the table again")
    finally:
        keeper.stop()
        b.remove()


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_a_cidr_overlapping_another_device_is_refused(tmp_path):
    """M3: two agents' bridges with the same network, or a network the host already has on a device."""
    from mesh.config import ConfigError
    from nodeagent.isolation.bridge import CidrOverlapError
    net = _net()
    first = WorkloadBridge(str(tmp_path / "a"), f"{net}.0/24")
    second = WorkloadBridge(str(tmp_path / "b"), f"{net}.0/25")         # overlaps the first one's
    try:
        first.ensure()
        with pytest.raises(CidrOverlapError, match=rf"workload_bridge_cidr: {net}.0/25 overlaps {net}.0/24 on "
                                                   rf"device {first.name}") as e:
            second.ensure()
        assert isinstance(e.value, ConfigError)        # at agent start: a configuration error
        assert not os.path.exists(f"/sys/class/net/{second.name}")
        first.ensure()                                   # its own bridge's prefix is no overlap
        a, b2, c = net.split(".")
        third = WorkloadBridge(str(tmp_path / "c"), f"{a}.{b2}.{int(c) + 128}.0/24")
        third.check_overlap()                            # the next /24: fine
        # a real network of the host (the outside interface's)
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True).stdout.split()
        if "inet" in out:
            import ipaddress
            iface = ipaddress.ip_interface(out[out.index("inet") + 1])
            dev = out[out.index("inet") - 1]
            host_net = next(iface.network.subnets(new_prefix=max(24, iface.network.prefixlen)))
            with pytest.raises(CidrOverlapError, match=f"on device {dev}"):
                WorkloadBridge(str(tmp_path / "d"), str(host_net)).check_overlap()
    finally:
        first.remove()
        second.remove()


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_attach_uses_the_namespace_it_pinned_not_the_pid(tmp_path, monkeypatch):
    """L1: the workload's init ends after its namespace was pinned (its pid free for reuse): every step
    still lands in that namespace; a pid in the host's namespace is refused before anything is made."""
    from nodeagent.isolation import bridge as bridge_mod
    from nodeagent.isolation.bridge import BridgeError
    from nodeagent.workload_confine import plug_network
    b = WorkloadBridge(str(tmp_path), f"{_net()}.0/24")
    p = _netns_proc()
    keep = os.open(f"/proc/{p.pid}/ns/net", os.O_RDONLY)       # the test's own look into that namespace
    real_run = bridge_mod._run

    def run_after_the_init_ended(*argv, **kw):
        if p.poll() is None:
            p.kill()
            p.wait()
        return real_run(*argv, **kw)
    try:
        with monkeypatch.context() as m:
            m.setattr(bridge_mod, "_run", run_after_the_init_ended)
            addr = plug_network(b, p.pid)
        inside = subprocess.run(["nsenter", f"--net=/proc/self/fd/{keep}", "ip", "-4", "-o", "addr", "show",
                                 "dev", "eth0"], capture_output=True, text=True, pass_fds=(keep,)).stdout
        assert f"inet {addr}/24" in inside
        host = subprocess.Popen(["sleep", "300"])                # a process of the host's namespace
        try:
            with pytest.raises(BridgeError, match="the host's"):
                b.attach(host.pid)
        finally:
            host.kill()
            host.wait()
        links = os.listdir("/sys/class/net")
        assert not [n for n in links if n.startswith("gwin")]          # no inner end landed on the host
    finally:
        os.close(keep)
        if p.poll() is None:
            p.kill()
            p.wait()
        b.remove()


def _isolators(tmp_path, cidr: str, n: int = 2) -> list:
    """`n` simulated agents of one agent process, wired as nodeagent/main.install_components does."""
    from types import SimpleNamespace

    from nodeagent.isolation.plan import IsolationSettings
    from nodeagent.isolation.probe import HostFeatures
    from nodeagent.isolation.setup import IsolationHost, isolator_for
    from nodeagent.isolation.users import TenantUsers
    host = IsolationHost(HostFeatures(setuid=True, no_new_privs=True, namespaces=["mount", "ipc", "pid", "net"]),
                         TenantUsers((300000, 300100), {}, str(tmp_path / "ids.json")),
                         IsolationSettings(bridge_cidr=cidr))
    cfg = SimpleNamespace(cgroup_base="gpumesh-test", gpu_backend="sim", state_dir=str(tmp_path))
    out = []
    for i in range(n):
        agent = SimpleNamespace(node=f"node-{i}", start_hooks=[], desired_hooks=[], labels={},
                                gpus=SimpleNamespace(uuids=[]))
        out.append(isolator_for(agent, cfg, host, str(tmp_path / "workloads" / agent.node)))
    return out


def test_agents_of_one_process_share_their_bridge(tmp_path):
    """L2: several simulated agents of one process (one state directory) get one bridge object: one lock."""
    a, b = _isolators(tmp_path, f"{_net()}.0/24")
    assert a.bridge is b.bridge


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_concurrent_attaches_of_two_agents_of_one_process_get_two_addresses(tmp_path):
    import threading
    isos = _isolators(tmp_path, f"{_net()}.0/24")
    procs = [_netns_proc() for _ in isos]
    got, errors = [], []
    start = threading.Barrier(len(isos))

    def attach(iso, p):
        start.wait()
        try:
            got.append(iso.bridge.attach(p.pid))
        except Exception as e:          # noqa: BLE001 - what the other agent's attach raised
            errors.append(e)
    try:
        for _ in range(3):              # a few rounds: the race needs both between used() and `ip link add`
            threads = [threading.Thread(target=attach, args=(iso, p)) for iso, p in zip(isos, procs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors and len(set(got)) == len(got) == len(isos)
            for p in procs:
                p.kill()
                p.wait()
            _wait(lambda: not isos[0].bridge.used(), "the veth pairs went with their namespaces")
            got.clear()
            procs = [_netns_proc() for _ in isos]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        isos[0].bridge.remove()


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "-")
def test_an_agent_whose_bridge_network_a_device_of_the_host_has_does_not_start(tmp_path):
    """M3 at agent start: `mesh-agent` exits with a configuration error naming the option, the prefix and
    the device (a device made here, with an address of that network, stands for a real network of the host)."""
    from tools.localhosts import write_host_files
    net = _net()
    dev = f"gmt{os.getpid() % 100000}"
    (tmp_path / "hosts").mkdir()
    hosts = write_host_files([{"node": "n1", "gpus": [{"model": "H100-80GB", "count": 1}]}], tmp_path / "hosts")
    subprocess.run(["ip", "link", "add", dev, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{net}.7/24", "dev", dev], check=True)
        argv = [sys.executable, "-m", "nodeagent.main", "--gpu-backend", "sim", "--sim-host-file", str(hosts["n1"]),
                "--state-dir", str(tmp_path / "agent"), "--insecure", "--control-plane", "127.0.0.1:9",
                "--metrics-listen", "", "--workload-bridge-cidr", f"{net}.0/24"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        try:
            _, err = p.communicate(timeout=240)      # it exits at once; still running by then: it started
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            pytest.fail(f"the agent started with a bridge network a device of the host has: {err[-2000:]}")
        assert p.returncode == 2, err[-2000:]
        assert (f"configuration error: workload_bridge_cidr: {net}.0/24 overlaps {net}.0/24 on device {dev}"
                in err), err[-2000:]
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        from nodeagent.isolation import egress
        egress.remove(str(tmp_path / "agent"))
