"""A tenant's workload with `gpumesh.io/network=none` tries to reach the host's services (docs/security.md,
Workload networks).

Real etcd, control plane and agent process on one simulated host. A workload of tenant `ta` in its own
network namespace tries etcd's client port, the control plane's gRPC port, the agent's mesh data plane
port and a listening socket of tenant `tb`'s workload, on the host's loopback and on its outside
address: every connection must fail, while a listener on its own loopback, reached by a second process
of the same workload, works. The same workload in `host` reaches the control plane's port, tb's listener
and the mesh port (what `none` takes away: the test can fail). The namespace survives an agent restart
(the agent re-adopts the workload; nothing about the namespace is the agent's).
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors
from tests.integration.conftest import stop_running, wait_for
from tools.localcluster import LocalCluster


def _no_netns() -> str:
    if os.geteuid() != 0:
        return "the agent must run as root to confine workloads and make network namespaces"
    from nodeagent.isolation.probe import CLONE_NEWNET, _try_unshare
    return "" if _try_unshare(CLONE_NEWNET) else "unshare(CLONE_NEWNET) fails on this machine"


pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(_no_netns()), reason=_no_netns() or "-")]
PY = sys.executable
HOSTS = [{"node": "net-a", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]}]
NONE = {"gpumesh.io/network": "none"}
HOST = {"gpumesh.io/network": "host"}
ISOLATED = {"gpumesh.io/network": "isolated"}
# this cluster's workload bridge network: not another test run's (a run in parallel has another pid)
BRIDGE_NET = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 256}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _outside_address() -> str:
    """This host's address on its default route ("" without one)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))          # TEST-NET-1: no packet is sent, the route is looked up
            addr = s.getsockname()[0]
    except OSError:
        return ""
    return "" if addr.startswith("127.") else addr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("netiso")
    c = LocalCluster(d, HOSTS, lease_ttl=3, agents_per_process=1,
                     agent_args=["--workload-stop-grace-seconds", "2", "--mesh-listen", f"0.0.0.0:{_free_port()}",
                                 "--workload-bridge-cidr", f"{BRIDGE_NET}.0/24"])
    c.start(timeout=90)
    yield c
    with c.client() as mesh:
        stop_running(mesh)
    c.stop()


@pytest.fixture(scope="module")
def mesh(cluster):
    cluster.wait_ready(timeout=30)
    with cluster.client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def slices(mesh):
    a = mesh.allocate(tenant="ta", mig_profile="1g.10gb").slices[0]
    b = mesh.allocate(tenant="tb", mig_profile="1g.10gb").slices[0]
    return a, b


def _ended(mesh, wid: str, timeout: float = 120) -> t.Workload:
    return wait_for(lambda: (x := mesh.get_workload(wid)).state in (
        t.WORKLOAD_STATE_SUCCEEDED, t.WORKLOAD_STATE_FAILED, t.WORKLOAD_STATE_STOPPED) and x, timeout, f"{wid} to end")


def _logs(mesh, wid: str) -> str:
    return b"".join(mesh.workload_logs(wid)).decode()


@pytest.fixture(scope="module")
def tb_listener(mesh, slices):
    """Tenant tb's server on every address of the host (a host-mode workload): its port."""
    code = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 0)); s.listen(16); print('PORT', s.getsockname()[1], flush=True)\n"
            "while True:\n    c, _ = s.accept(); c.sendall(b'tb-secret'); c.close()\n")
    w = mesh.run_workload(slices[1].id, [PY, "-c", code], labels=HOST)
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    out = wait_for(lambda: "PORT " in (o := _logs(mesh, w.id)) and o, 60, "tb's listener to print its port")
    yield int(out.split("PORT ", 1)[1].split()[0])
    mesh.stop_workload(w.id)


def _targets(cluster, mesh, tb_port: int, bridge: bool = False) -> dict[str, tuple[str, int]]:
    etcd_ports = json.loads((cluster.etcd_data_dir / "ports.json").read_text())
    etcd_client = int(etcd_ports.get("client") or sorted(etcd_ports.values())[0])
    cp_host, _, cp_port = cluster.endpoint.rpartition(":")
    mesh_port = int(next(a for a in cluster.agent_args if a.startswith("0.0.0.0:")).rpartition(":")[2])
    if bridge:      # the host's own address on the workload bridge
        return {"control-plane@bridge": (f"{BRIDGE_NET}.1", int(cp_port)),
                "tenant-b@bridge": (f"{BRIDGE_NET}.1", tb_port)}
    targets = {"etcd": ("127.0.0.1", etcd_client), "control-plane": (cp_host, int(cp_port)),
               "mesh-data-plane": ("127.0.0.1", mesh_port), "tenant-b": ("127.0.0.1", tb_port)}
    outside = _outside_address()
    if outside:
        targets.update({"mesh-data-plane@outside": (outside, mesh_port), "tenant-b@outside": (outside, tb_port)})
    return targets


PROBE = r"""
import json, socket, subprocess, sys
res = {}
for name, (host, port) in TARGETS.items():
    try:
        socket.create_connection((host, port), timeout=5).close()
        res[name] = "CONNECTED"
    except OSError as e:
        res[name] = f"{type(e).__name__}: {e}"
# its own loopback: a listener here, a second process of the workload dials it (a localhost rendezvous)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
subprocess.run([sys.executable, "-c", "import socket, sys; c = socket.create_connection(('127.0.0.1', "
                "int(sys.argv[1])), timeout=10); c.sendall(b'hello'); c.close()", str(srv.getsockname()[1])],
               check=True, timeout=60)
conn, _ = srv.accept()
res["own-loopback"] = conn.recv(5).decode()
res["interfaces"] = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])
print("RESULT " + json.dumps(res), flush=True)
"""


def _probe(mesh, slice_id: str, targets: dict, labels: dict, python: str = PY) -> tuple[t.Workload, dict]:
    code = f"TARGETS = {targets!r}\n" + PROBE
    w = mesh.run_workload(slice_id, [python, "-c", code], labels=labels)
    done = _ended(mesh, w.id)
    out = _logs(mesh, w.id)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED and "RESULT " in out, out
    return done, json.loads(out.split("RESULT ", 1)[1].splitlines()[0])


def test_a_workload_without_network_reaches_nothing_of_the_host_but_its_own_loopback(cluster, mesh, slices,
                                                                                     tb_listener):
    targets = _targets(cluster, mesh, tb_listener)
    _, res = _probe(mesh, slices[0].id, targets, NONE)
    for name in targets:
        assert res[name] != "CONNECTED", (name, res)
        assert "unreachable" in res[name].lower() or "refused" in res[name].lower(), (name, res)
    assert res["own-loopback"] == "hello"
    assert res["interfaces"] == ["lo"]


def test_the_same_workload_on_the_host_network_reaches_them(cluster, mesh, slices, tb_listener):
    """The control: without the namespace the probe connects (the egress guard still denies etcd)."""
    targets = _targets(cluster, mesh, tb_listener)
    _, res = _probe(mesh, slices[0].id, targets, HOST)
    assert res["control-plane"] == "CONNECTED" and res["tenant-b"] == "CONNECTED", res
    assert res["mesh-data-plane"] == "CONNECTED", res
    assert res["etcd"] != "CONNECTED" and "lo" in res["interfaces"] and len(res["interfaces"]) > 1, res
    _, default = _probe(mesh, slices[0].id, targets, {})            # no label: the agent's default, host
    assert default["control-plane"] == "CONNECTED", default


def test_a_slice_label_gives_its_workloads_no_network(mesh, tb_listener, cluster):
    s = mesh.allocate(tenant="ta", mig_profile="1g.10gb", labels=NONE).slices[0]
    try:
        targets = _targets(cluster, mesh, tb_listener)
        _, res = _probe(mesh, s.id, {"control-plane": targets["control-plane"]}, {})
        assert res["control-plane"] != "CONNECTED" and res["interfaces"] == ["lo"], res
        _, res = _probe(mesh, s.id, {"control-plane": targets["control-plane"]}, HOST)   # the run's label wins
        assert res["control-plane"] == "CONNECTED", res
    finally:
        mesh.release(s.id)


def test_bad_network_labels_are_refused_at_the_api(mesh, slices):
    with pytest.raises(errors.InvalidArgument, match=r"labels\[gpumesh.io/network\]: 'bridge' is not a network mode"):
        mesh.run_workload(slices[0].id, ["true"], labels={"gpumesh.io/network": "bridge"})
    with pytest.raises(errors.InvalidArgument, match="criu"):
        mesh.run_workload(slices[0].id, ["true"], labels={**NONE, "gpumesh.io/isolation": "criu"})
    with pytest.raises(errors.InvalidArgument, match=r"spec.labels\[gpumesh.io/network\]"):
        mesh.allocate(tenant="ta", mig_profile="1g.10gb", labels={"gpumesh.io/network": "everything"})


def test_the_namespace_outlives_an_agent_restart(cluster, mesh, slices):
    """The agent is killed and restarted: it re-adopts the workload, which still has only its loopback."""
    code = ("import os, socket, time\nprint('NETNS', os.readlink('/proc/self/ns/net'), flush=True)\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(4)\n"
            "while True:\n"
            "    c = socket.create_connection(srv.getsockname(), timeout=5); srv.accept()[0].close(); c.close()\n"
            "    time.sleep(0.5)\n")
    w = mesh.run_workload(slices[0].id, [PY, "-c", code], labels=NONE)
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    inside = wait_for(lambda: "NETNS " in (o := _logs(mesh, w.id)) and o, 60, "the workload to start")
    netns = inside.split("NETNS ", 1)[1].split()[0]
    assert netns != os.readlink("/proc/self/ns/net")
    cluster.kill_agent("net-a")
    cluster.start_agent("net-a")
    cluster.wait_ready(timeout=90)
    wait_for(lambda: mesh.get_workload(w.id).state == t.WORKLOAD_STATE_RUNNING, 60, "the workload re-adopted")
    after = mesh.get_workload(w.id)
    assert after.pid == w.pid and os.readlink(f"/proc/{after.pid}/ns/net") == netns
    with open(f"/proc/{after.pid}/net/dev", encoding="ascii") as f:
        assert [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]
    mesh.stop_workload(w.id)
    assert _ended(mesh, w.id).state in (t.WORKLOAD_STATE_STOPPED, t.WORKLOAD_STATE_SUCCEEDED)


TORCH_DIST = r"""
import os, torch, torch.distributed as dist, torch.multiprocessing as mp

def rank(r, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    x = torch.tensor([r + 1.0])
    dist.all_reduce(x)
    if r == 0:
        print("ALLREDUCE", x.item(), flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    mp.start_processes(rank, args=(port,), nprocs=2, join=True, start_method="fork")   # -c: no spawn
"""


def test_torch_distributed_rendezvous_on_its_own_loopback(mesh, slices):
    """Two ranks of one workload rendezvous over 127.0.0.1 (torch.distributed, gloo) in mode none."""
    pytest.importorskip("torch")
    w = mesh.run_workload(slices[0].id, [PY, "-c", TORCH_DIST],
                          labels={**NONE, "gpumesh.io/memory-bytes": str(4 << 30)},
                          env={"GLOO_SOCKET_IFNAME": "lo"})
    done = _ended(mesh, w.id, timeout=300)
    out = _logs(mesh, w.id)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED and "ALLREDUCE 3.0" in out, out


SERVE = r"""
import socket, sys, threading, time
def serve(s, who):
    while True:
        c, _ = s.accept(); c.sendall(who.encode()); c.close()
listening = socket.socket(); listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listening.bind(("0.0.0.0", 8000)); listening.listen(16)      # listening before SERVING is printed
threading.Thread(target=serve, args=(listening, WHO), daemon=True).start()
"""


def _serving(mesh, slice_id: str, who: str, targets: dict | None = None) -> t.Workload:
    """An isolated workload answering `who` on port 8000 of its address; with `targets`, it first probes them."""
    from nodeagent.isolation.bridge import WorkloadBridge
    if WorkloadBridge.problem():
        pytest.skip(f"isolated workloads need a bridge: {WorkloadBridge.problem()}")
    code = f"WHO = {who!r}\nTARGETS = {targets or {}!r}\n" + SERVE + (PROBE if targets else "") + \
        "\nprint('SERVING', flush=True)\nwhile True:\n    time.sleep(1)\n"
    w = mesh.run_workload(slice_id, [PY, "-c", code], labels=ISOLATED)
    # PENDING until the agent has it; just after an agent restart its session may be opening, and UNKNOWN while
    # the killed agent's lease runs out before the new one registers (the node reads Ready until then)
    waiting = (t.WORKLOAD_STATE_PENDING, t.WORKLOAD_STATE_UNKNOWN)
    w = wait_for(lambda: (x := mesh.get_workload(w.id)).state not in waiting and x, 60, f"{who} to start")
    assert w.state == t.WORKLOAD_STATE_RUNNING, w.message
    wait_for(lambda: "SERVING" in _logs(mesh, w.id), 120, f"{who} to serve")
    return mesh.get_workload(w.id)


def _ask(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=10) as c:
        return c.recv(64).decode()


def test_an_isolated_workload_serves_the_host_and_reaches_nothing(cluster, mesh, slices, tb_listener):
    b = _serving(mesh, slices[1].id, "tenant-b")
    assert b.network_address.startswith(BRIDGE_NET + ".") and b.network_address != f"{BRIDGE_NET}.1"
    targets = {**_targets(cluster, mesh, tb_listener), **_targets(cluster, mesh, tb_listener, bridge=True),
               "isolated-b": (b.network_address, 8000)}
    a = _serving(mesh, slices[0].id, "tenant-a", targets)
    try:
        out = _logs(mesh, a.id)
        res = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        for name in targets:
            assert res[name] != "CONNECTED", (name, res)
        assert res["own-loopback"] == "hello" and res["interfaces"] == ["eth0", "lo"], res
        assert a.network_address not in ("", b.network_address)
        assert _ask(a.network_address, 8000) == "tenant-a" and _ask(b.network_address, 8000) == "tenant-b"
        # the control: a host-mode workload (and any host process) reaches the isolated one's port, and tb's
        # server on the host's bridge address, which the isolated workload was refused (by the bridge's table)
        _, host_res = _probe(mesh, slices[0].id, {"isolated-b": (b.network_address, 8000),
                                                  "tenant-b@bridge": targets["tenant-b@bridge"]}, HOST)
        assert host_res["isolated-b"] == "CONNECTED" and host_res["tenant-b@bridge"] == "CONNECTED", host_res
        assert mesh.get_workload(a.id).network_address == a.network_address
    finally:
        for w in (a, b):
            mesh.stop_workload(w.id)
    for w in (a, b):
        _ended(mesh, w.id)
    # their addresses are free again with their namespaces: the bridge has no port left
    bridge = next(n for n in os.listdir("/sys/class/net") if n.startswith("gmb") and
                  os.path.exists(f"/sys/class/net/{n}/brif") and
                  f"{BRIDGE_NET}.1" in os.popen(f"ip -4 -o addr show dev {n}").read())
    wait_for(lambda: not os.listdir(f"/sys/class/net/{bridge}/brif"), 30, "the veth pairs to go")


def test_an_isolated_workload_keeps_its_address_across_an_agent_restart(cluster, mesh, slices):
    """The veth pair belongs to the workload's namespace: after `kill -9` and a restart of the agent it still
    answers at its address, and the next isolated workload gets another (the bridge's ports say which are
    taken: nothing to persist)."""
    a = _serving(mesh, slices[0].id, "before-restart")
    try:
        assert _ask(a.network_address, 8000) == "before-restart"
        cluster.kill_agent("net-a")
        cluster.start_agent("net-a")
        cluster.wait_ready(timeout=90)
        wait_for(lambda: mesh.get_workload(a.id).state == t.WORKLOAD_STATE_RUNNING, 60, "the workload re-adopted")
        assert mesh.get_workload(a.id).network_address == a.network_address
        assert _ask(a.network_address, 8000) == "before-restart"
        b = _serving(mesh, slices[1].id, "after-restart")
        assert b.network_address not in ("", a.network_address)
        assert _ask(b.network_address, 8000) == "after-restart"
        mesh.stop_workload(b.id)
    finally:
        mesh.stop_workload(a.id)
