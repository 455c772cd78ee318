"""Another tenant's workload reads the files the cluster wrote, by path (docs/security.md, "Files on the host").

Real etcd, control plane and two agent processes, the cluster's files under a directory of /var/tmp that
every user may traverse (as an operator's `/var/lib/gpumesh` or `meshctl up --state-dir /srv/mesh`), the
checkpoint store beside them. Tenant `ta` leaves what a tenant leaves: a checkpoint in the store (the
training example through the SDK), workload logs and records, and (with CRIU) a transparently migrated
workload whose log the target agent wrote. Tenant `tb`'s workload then tries, path by path, every file and
directory the test (root) finds under the cluster's directory: it must read, list or write none of them
except its own. Both kinds of workload attack: `gpumesh.io/isolation=criu` ones see the host's file tree
with their uid's permissions (no mount namespace), namespaced ones everything but their own agent's paths.

Before the fix the checkpoint store (directories 0755, files 0644: the manifest and the sealed records),
the log of a CRIU-restored workload (0644), the agents' `workloads/` and `sim/` directories (0755) and
simulated device state (0644), the control plane's files (history.db with every tenant's costs, identity,
etcd's ports) and the local cluster's logs, host files and cluster.json (0644) were readable by any uid.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh.migrationapi import migration_phase
from tests import criu_gate
from tests.integration.conftest import client_for_test, wait_for, workload_cluster

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the agent must run as root to confine workloads")]
HOSTS = [{"node": "fs-a", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]},
         {"node": "fs-b", "gpus": [{"model": "H100-80GB", "count": 1, "mig": True}]}]
ROOT = Path(__file__).resolve().parents[2]
# the attacker runs as tenant tb's uid without the test's Python (it may live in root's home): the system's
TENANT_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
CRIU = {"gpumesh.io/isolation": "criu"}
COUNTER = "import time\nn = 0\nwhile True:\n    n += 1; print('TA-SECRET-LINE', n, flush=True); time.sleep(0.1)\n"

# Tries every path it is given: READ (a regular file opened and read), LISTED (a directory with entries),
# WRITABLE, or DENIED; its own files (its uid's) are left out.
SWEEP = """
import json, os, stat, sys
base = sys.argv[1]
paths = [os.path.join(base, p) for chunk in sys.argv[2:] for p in json.loads(chunk)]
me = os.getuid()
for p in paths:
    try:
        st = os.lstat(p)
    except OSError as e:
        print('DENIED', p, e.errno); continue
    if st.st_uid == me or stat.S_ISLNK(st.st_mode):
        continue
    if os.access(p, os.W_OK):
        print('WRITABLE', p)
    if stat.S_ISDIR(st.st_mode):
        try:
            n = len(os.listdir(p))
            print('LISTED' if n else 'EMPTY', p, n)
        except OSError as e:
            print('DENIED', p, e.errno)
    elif stat.S_ISREG(st.st_mode):
        try:
            with open(p, 'rb') as f:
                print('READ', p, f.read(24))
        except OSError as e:
            print('DENIED', p, e.errno)
print('SWEPT', len(paths), flush=True)
"""


@pytest.fixture(scope="module")
def cluster():
    d = Path(tempfile.mkdtemp(prefix="gpumesh-fsaudit-", dir="/var/tmp"))
    os.chmod(d, 0o755)              # as /var/lib or an operator's --state-dir: every user may traverse it
    try:
        with workload_cluster(d / "mesh", HOSTS, agent_args=["--workload-stop-grace-seconds", "2",
                                                             "--checkpoint-dir", str(d / "store")]) as c:
            c.base = d
            yield c
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mesh(cluster):
    with client_for_test(cluster) as client:
        yield client


def finished(mesh, wid: str, timeout: float = 60) -> t.Workload:
    return wait_for(lambda: (x := mesh.get_workload(wid)).state in (
        t.WORKLOAD_STATE_SUCCEEDED, t.WORKLOAD_STATE_FAILED, t.WORKLOAD_STATE_STOPPED) and x, timeout, f"{wid} to end")


@pytest.fixture(scope="module")
def tenant_a(cluster, mesh):
    """What tenant ta leaves on the hosts: a checkpoint in the store and a finished workload's files."""
    pytest.importorskip("torch", reason="the checkpointing example needs torch (pip install 'gpumesh[torch]')")
    s = mesh.allocate(tenant="ta", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, [sys.executable, "-m", "tools.examples.train_mnist_like", "--steps", "100000",
                                 "--sleep-ms", "20", "--print-every", "5"], env={"PYTHONPATH": str(ROOT)})
    wait_for(lambda: b'"step"' in b"".join(mesh.workload_logs(w.id)), 120, "training to start")
    ck = mesh.checkpoint(w.id)
    mesh.stop_workload(w.id)
    done = mesh.run_workload(s.id, [TENANT_PY, "-c", "print('TA-SECRET-LINE')"], labels=CRIU)
    finished(mesh, done.id)
    store = cluster.base / "store" / ck.path
    assert (store / "manifest.json").is_file()
    return {"checkpoint": store, "workload": w}


def every_path(cluster) -> list[str]:
    """Every file and directory (as root sees them) under the cluster's directory and the store."""
    out = []
    for top in (cluster.base / "mesh", cluster.base / "store"):
        out.append(str(top))
        for dirpath, dirs, files in os.walk(top):
            out += [os.path.join(dirpath, n) for n in dirs + files]
    return out


def attack(mesh, cluster, tenant_slice: str, labels: dict, paths: list[str]) -> str:
    """Runs SWEEP over `paths` as a workload of `tenant_slice` (the paths relative to the test's directory, in
    arguments of at most 30,000 characters: the API's bound on one is 32,768)."""
    rel = [os.path.relpath(p, cluster.base) for p in paths]
    chunks, cur = [], []
    for r in rel:
        if cur and len(json.dumps(cur + [r])) > 30000:
            chunks.append(json.dumps(cur))
            cur = []
        cur.append(r)
    chunks.append(json.dumps(cur))
    w = mesh.run_workload(tenant_slice, [TENANT_PY, "-c", SWEEP, str(cluster.base), *chunks], labels=labels)
    done = finished(mesh, w.id, 120)
    out = b"".join(mesh.workload_logs(w.id)).decode(errors="replace")
    assert done.state == t.WORKLOAD_STATE_SUCCEEDED, out
    assert f"SWEPT {len(paths)}" in out, out
    return out


def exposed(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("READ ", "LISTED ", "WRITABLE "))]


@pytest.fixture(scope="module")
def tb_slice(mesh, tenant_a):
    return mesh.allocate(tenant="tb", mig_profile="1g.10gb").slices[0]


@pytest.mark.parametrize("labels", [CRIU, {}], ids=["criu", "namespaced"])
def test_another_tenants_workload_reads_no_file_of_the_cluster(cluster, mesh, tenant_a, tb_slice, labels):
    paths = every_path(cluster)
    ck = tenant_a["checkpoint"]
    must_cover = [ck / "manifest.json", *sorted((ck / "data").iterdir())[:1], cluster.base / "store",
                  cluster.state_dir / "controlplane" / "history.db", cluster.state_dir / "logs" / "controlplane.log"]
    assert all(str(p) in paths for p in must_cover), must_cover
    logs = [p for p in paths if p.endswith(f"{tenant_a['workload'].id}.log")]
    assert logs, "tenant ta's workload log is among the paths tried"
    out = attack(mesh, cluster, tb_slice.id, labels, paths)
    assert "TA-SECRET-LINE" not in out and '"step"' not in out
    assert exposed(out) == [], "\n".join(exposed(out))
    assert f"DENIED {ck / 'manifest.json'}" in out


@criu_gate.needs_criu
def test_a_transparently_migrated_workloads_files_stay_its_own(cluster, mesh, tenant_a, tb_slice):
    """The target agent writes the restored workload's log (the log so far travels with the CRIU images): it
    is as private as any workload log, and the images' directory is gone or unreadable."""
    s = mesh.allocate(tenant="ta", mig_profile="1g.10gb").slices[0]
    w = mesh.run_workload(s.id, [TENANT_PY, "-c", COUNTER], labels=CRIU)
    wait_for(lambda: b"TA-SECRET-LINE 5" in b"".join(mesh.workload_logs(w.id)), 60, "the counter to count")
    m = mesh.wait_migration(mesh.migrate(w.id, mode="transparent").id, timeout=180)
    assert migration_phase(m) == "done", m.message
    moved = mesh.get_workload(w.id)
    assert moved.node == m.target_node != w.node
    paths = every_path(cluster)
    restored = [p for p in paths if p.endswith(f"{w.id}.log") and f"/{m.target_node}/" in p]
    assert restored, "the restored workload's log on the target is among the paths tried"
    mode = stat.S_IMODE(os.stat(restored[0]).st_mode)
    assert mode & 0o077 == 0, f"{restored[0]} has mode {oct(mode)}"
    out = attack(mesh, cluster, tb_slice.id, CRIU, paths)
    assert "TA-SECRET-LINE" not in out
    assert exposed(out) == [], "\n".join(exposed(out))
    mesh.stop_workload(w.id)
