"""A tenant's workload attacks the host and the other tenant (issue 10, section 1).

Real etcd, control plane and agent process; two tenants on one simulated host. Each attack is a
workload of tenant `ta` that tries something it must not manage and prints what happened; the
test reads its log. Tenant `tb`'s sleeper must survive all of them, and the agent must still
run workloads afterwards.

Before the fix every workload ran as the agent's user (root here): each of these attacks
succeeded (checked by running this file against the code before the change).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile

import pytest

from gpumesh.v1 import types_pb2 as t
from tests.integration.conftest import stop_running, wait_for
from tools.localcluster import LocalCluster

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the agent must run as root to confine workloads")]
PY = sys.executable
HOSTS = [{"node": "iso-a", "gpus": [{"model": "H100-80GB", "count": 2, "mig": True}]}]
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("iso")
    store = d / "store"
    (store / "tb").mkdir(parents=True)
    (store / "tb" / "ck-secret.bin").write_bytes(b"TENANT-B-CHECKPOINT")
    os.chmod(store / "tb" / "ck-secret.bin", 0o644)       # even world-readable, it must stay out of reach
    c = LocalCluster(d, HOSTS, lease_ttl=3, agents_per_process=1,
                     agent_args=["--workload-stop-grace-seconds", "2", "--checkpoint-dir", str(store)])
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


@pytest.fixture(scope="module")
def victim(mesh, slices):
    """tenant tb's long-running workload: every attack leaves it running."""
    w = mesh.run_workload(slices[1].id, ["sleep", "600"])
    assert w.state == t.WORKLOAD_STATE_RUNNING and w.pid > 0
    yield w
    mesh.stop_workload(w.id)


def run(mesh, slice_id: str, code: str, labels: dict | None = None, timeout: float = 60) -> tuple[t.Workload, str]:
    w = mesh.run_workload(slice_id, [PY, "-c", code], labels=labels or {})
    done = wait_for(lambda: (x := mesh.get_workload(w.id)).state in (
        t.WORKLOAD_STATE_SUCCEEDED, t.WORKLOAD_STATE_FAILED, t.WORKLOAD_STATE_STOPPED) and x, timeout, f"{w.id} to end")
    return done, b"".join(mesh.workload_logs(w.id)).decode()


def still_fine(mesh, victim) -> None:
    assert mesh.get_workload(victim.id).state == t.WORKLOAD_STATE_RUNNING
    assert os.path.exists(f"/proc/{victim.pid}")


def test_runs_as_the_tenants_unprivileged_user(mesh, slices, victim):
    done, out = run(mesh, slices[0].id, "import os; print('IDS', os.getuid(), os.geteuid(), os.getgid(), "
                                        "sorted(os.getgroups()), flush=True)")
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
    uid, euid, gid, groups = out.split("IDS ", 1)[1].split(" ", 3)
    assert int(uid) == int(euid) and int(uid) not in (0, os.getuid()) and int(gid) != 0
    assert groups.strip() in ("[]", f"[{gid}]")         # no supplementary groups
    _, out_b = run(mesh, slices[1].id, "import os; print('IDS', os.getuid(), flush=True)")
    assert int(out_b.split("IDS ", 1)[1]) not in (0, int(uid))   # the other tenant: another uid
    _, nnp = run(mesh, slices[0].id, "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')])")
    assert "NoNewPrivs:\\t1" in nnp
    still_fine(mesh, victim)


def test_cannot_read_etc_shadow(mesh, slices, victim):
    done, out = run(mesh, slices[0].id, "open('/etc/shadow').read(); print('READ SHADOW')")
    assert "READ SHADOW" not in out and "PermissionError" in out and done.state == t.WORKLOAD_STATE_FAILED
    still_fine(mesh, victim)


def test_cannot_read_the_agents_state_or_the_checkpoint_store(cluster, mesh, slices, victim):
    agent_dir = cluster.state_dir / "agents" / "iso-a"
    store = cluster.state_dir / "store"
    code = ("import os\n"
            f"for p in [{str(agent_dir)!r}, {str(agent_dir / 'workloads')!r}, {str(store / 'tb')!r}]:\n"
            "    try:\n"
            "        print('LISTED', p, os.listdir(p))\n"
            "    except OSError as e:\n"
            "        print('DENIED', p, type(e).__name__)\n"
            f"for p in [{str(store / 'tb' / 'ck-secret.bin')!r}, {str(agent_dir / 'isolation' / 'tenant-ids.json')!r},"
            f" {str(agent_dir / 'workloads' / 'iso-a' / (victim.id + '.json'))!r}]:\n"
            "    try:\n"
            "        print('READ', p, open(p, 'rb').read()[:40])\n"
            "    except OSError as e:\n"
            "        print('DENIED', p, type(e).__name__)\n")
    done, out = run(mesh, slices[0].id, code)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
    assert "READ " not in out and "TENANT-B-CHECKPOINT" not in out, out
    assert all(("LISTED " + p + " []") in out or ("DENIED " + p) in out
               for p in (str(agent_dir), str(agent_dir / "workloads"), str(store / "tb"))), out
    still_fine(mesh, victim)


def test_cannot_read_another_tenants_shared_memory(mesh, slices, victim):
    from multiprocessing import shared_memory
    name = f"gpumesh-b-x-{slices[1].id}"            # a mesh segment of tenant tb's slice
    seg = shared_memory.SharedMemory(name=name, create=True, size=4096)
    try:
        seg.buf[:12] = b"TB-MESH-DATA"
        os.chmod(f"/dev/shm/{name}", 0o644)        # even world-readable
        done, out = run(mesh, slices[0].id, f"import os; print('SHM', os.listdir('/dev/shm'))\n"
                                            f"try:\n    print('READ', open('/dev/shm/{name}', 'rb').read(12))\n"
                                            "except OSError as e:\n    print('DENIED', type(e).__name__)")
        assert "TB-MESH-DATA" not in out and "DENIED" in out and name not in out.split("SHM", 1)[1].split("\n")[0]
    finally:
        seg.close()
        seg.unlink()
    still_fine(mesh, victim)


def test_cannot_signal_another_tenants_process(mesh, slices, victim):
    done, out = run(mesh, slices[0].id, "import os, signal\n"
                                        f"try:\n    os.kill({victim.pid}, signal.SIGKILL); print('KILLED')\n"
                                        "except OSError as e:\n    print('DENIED', type(e).__name__)\n"
                                        "print('PIDS', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert "KILLED" not in out and "DENIED" in out
    pids = eval(out.split("PIDS ", 1)[1].splitlines()[0])      # noqa: S307 - a list of ints it printed
    assert max(pids) < 100          # its own PID namespace: only its own few processes
    still_fine(mesh, victim)


def test_sees_only_its_own_gpu_device_nodes(mesh, slices, victim):
    # a node of the other GPU at a path the workload can reach (as if the host exposed it):
    # the devices cgroup refuses it whatever the environment says
    d = tempfile.mkdtemp(prefix="gpumesh-isotest-", dir="/var/tmp")
    os.chmod(d, 0o755)
    other = os.path.join(d, "nvidia1")
    os.mknod(other, 0o666 | stat.S_IFCHR, os.makedev(195, 1))
    os.chmod(other, 0o666)                      # as the driver makes its nodes
    try:
        code = ("import os, errno\n"
                "os.environ['CUDA_VISIBLE_DEVICES'] = '0,1'\n"
                "print('DEV', sorted(os.listdir('/dev')), sorted(os.listdir('/dev/nvidia-caps')))\n"
                f"for p in ['/dev/nvidia0', '/dev/nvidia1', {other!r}]:\n"
                "    try:\n"
                "        os.close(os.open(p, os.O_RDWR)); print('OPENED', p)\n"
                "    except OSError as e:\n"
                "        print('ERR', p, errno.errorcode[e.errno])\n"
                "try:\n"
                "    os.mknod('/tmp/nv1', 0o666 | 0o020000, os.makedev(195, 1)); print('MKNOD ok')\n"
                "except OSError as e:\n"
                "    print('MKNOD', errno.errorcode[e.errno])\n")
        done, out = run(mesh, slices[0].id, code)
        assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
        devs = out.split("DEV ", 1)[1].splitlines()[0]
        assert "'nvidia0'" in devs and "'nvidia1'" not in devs and "'nvidiactl'" in devs
        assert "ERR /dev/nvidia0 ENXIO" in out            # its own: reachable (no driver behind the stand-in)
        assert "ERR /dev/nvidia1 ENOENT" in out
        assert f"ERR {other} EPERM" in out                 # the devices cgroup
        assert "MKNOD EPERM" in out and "OPENED" not in out
    finally:
        shutil.rmtree(d, ignore_errors=True)
    still_fine(mesh, victim)


def test_memory_limit(mesh, slices, victim):
    done, out = run(mesh, slices[0].id, "x = bytearray(400 << 20); x[::4096] = b'1' * len(x[::4096]); "
                                        "print('ALLOCATED', flush=True)", labels={"gpumesh.io/memory-bytes": str(128 * MiB)})
    assert "ALLOCATED" not in out and done.state == t.WORKLOAD_STATE_FAILED
    assert "SIGKILL" in done.message or "MemoryError" in out
    ok, out = run(mesh, slices[0].id, "x = bytearray(32 << 20); print('SMALL OK')",
                  labels={"gpumesh.io/memory-bytes": str(128 * MiB)})
    assert ok.state == t.WORKLOAD_STATE_SUCCEEDED and "SMALL OK" in out
    still_fine(mesh, victim)


def test_pids_limit(mesh, slices, victim):
    code = ("import os, time\n"
            "n = 0\n"
            "try:\n"
            "    for _ in range(200):\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(5); os._exit(0)\n"
            "        n += 1\n"
            "    print('FORKED', n)\n"
            "except OSError as e:\n"
            "    print('STOPPED AT', n, e.strerror)\n")
    done, out = run(mesh, slices[0].id, code, labels={"gpumesh.io/pids": "30"})
    assert "FORKED" not in out and "STOPPED AT" in out, out
    assert int(out.split("STOPPED AT ", 1)[1].split()[0]) < 30
    still_fine(mesh, victim)


def test_bad_resource_label_is_refused_with_the_label_named(mesh, slices):
    w = mesh.run_workload(slices[0].id, ["true"], labels={"gpumesh.io/memory-bytes": "lots"})
    w = wait_for(lambda: (x := mesh.get_workload(w.id)).state == t.WORKLOAD_STATE_FAILED and x, 30, "refusal")
    assert "gpumesh.io/memory-bytes" in w.message


SYSCALLS = """
import ctypes, errno, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def report(name, rc):
    print(name, 'DENIED' if rc == -1 and ctypes.get_errno() == errno.EPERM else f'ALLOWED rc={rc} errno={ctypes.get_errno()}')
report('unshare-user', libc.unshare(0x10000000))             # CLONE_NEWUSER: allowed unprivileged on this kernel
report('keyctl', libc.syscall(250, 0, -3, 0))                 # keyctl(KEYCTL_GET_KEYRING_ID, session)
child = subprocess.Popen(['sleep', '30'])                     # its own child: same uid, readable without the filter
class IoVec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
buf = ctypes.create_string_buffer(8)
local, remote = IoVec(ctypes.addressof(buf), 8), IoVec(0x400000, 8)
report('process_vm_readv', libc.process_vm_readv(child.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
report('ptrace-attach', libc.ptrace(16, child.pid, 0, 0))    # PTRACE_ATTACH
child.kill(); child.wait()
t = threading.Thread(target=lambda: print('THREAD OK')); t.start(); t.join()
print('SUBPROCESS', subprocess.run(['echo', 'ok'], capture_output=True, text=True).stdout.strip())
"""


def test_syscalls_that_reach_other_processes_or_the_kernel_are_denied(mesh, slices, victim):
    """The seccomp filter (nodeagent/isolation/syscallfilter.py): without it every one of these succeeds for
    an unprivileged user on this kernel (a user namespace, its own child's memory, ptrace of its own child,
    the kernel keyring), and ordinary programs (threads, subprocesses) still work under it."""
    done, out = run(mesh, slices[0].id, SYSCALLS)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
    for name in ("unshare-user", "keyctl", "process_vm_readv", "ptrace-attach"):
        assert f"{name} DENIED" in out, out
    assert "THREAD OK" in out and "SUBPROCESS ok" in out
    assert mesh.get_node("iso-a").inventory.labels["gpumesh.io/workload-seccomp"] == "on"
    still_fine(mesh, victim)


def test_cannot_connect_to_etcd_or_the_metrics_ports(cluster, mesh, slices, victim):
    """The egress guard (nodeagent/isolation/egress.py): etcd's ports and the control plane's metrics port are
    refused to a tenant's process; another local port (a listener this test opens) is not."""
    import json
    import socket
    import subprocess
    if shutil.which("nft") is None:
        pytest.skip("the nft command is not installed (apt install nftables): the agent cannot guard egress")
    probe = subprocess.run(["nft", "-f", "-"], input="table inet gpumesh_probe\ndelete table inet gpumesh_probe\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"nftables is not usable on this host: {probe.stderr.strip()}")
    node = mesh.get_node(HOSTS[0]["node"])
    assert node.inventory.labels.get("gpumesh.io/workload-egress") == "guarded", dict(node.inventory.labels)
    etcd = json.loads((cluster.etcd_data_dir / "ports.json").read_text())
    metrics = int(cluster.metrics_endpoint.rpartition(":")[2])
    with socket.socket() as open_port:
        open_port.bind(("127.0.0.1", 0))
        open_port.listen(8)
        ports = {"etcd": etcd["client"], "etcd-peer": etcd["peer"], "metrics": metrics,
                 "other": open_port.getsockname()[1]}
        code = ("import socket\n"
                f"for name, port in {ports!r}.items():\n"
                "    s = socket.socket(); s.settimeout(10)\n"
                "    try:\n"
                "        s.connect(('127.0.0.1', port)); print('CONNECTED', name, flush=True)\n"
                "    except OSError as e:\n"
                "        print('REFUSED', name, e.errno, flush=True)\n")
        done, out = run(mesh, slices[0].id, code)
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
    for name in ("etcd", "etcd-peer", "metrics"):
        assert f"REFUSED {name}" in out, out
    assert "CONNECTED other" in out, out
    # the agent's own user (root here) still reaches etcd: only tenant uids are guarded
    with socket.create_connection(("127.0.0.1", etcd["client"]), timeout=10):
        pass
    still_fine(mesh, victim)


def test_agent_still_runs_workloads_after_the_attacks(mesh, slices, victim):
    done, out = run(mesh, slices[0].id, "print('STILL HERE')")
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED and "STILL HERE" in out
    still_fine(mesh, victim)
